"""Files written whole: to a temporary name first, renamed when complete; earlier runs' files kept."""

import atexit
import contextlib
import json
import os
import shutil
from glob import escape, glob

import torch

from errors import UserError


@contextlib.contextmanager
def replaced(path):
    """Yields a temporary name beside path; once the block has written it whole, it becomes path. An error
    or a kill midway leaves path as it was (and the next check_out_files clears the temporary file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path):
    """torch.save into path, whole or not at all; a disk that fills up midway is one line, the earlier file
    kept."""
    try:
        with replaced(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as e:  # torch's word for any failed write: "PytorchStreamWriter failed writing ..."
        if "writ" not in str(e):
            raise
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        raise UserError(f"cannot write {path} ({' '.join(str(e).split())}): its disk has {free / 2**20:,.0f} "
                        "MB free; free some space (the file there before is kept) and run again") from None


def write_json(obj, path):
    with replaced(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def check_out_files(paths, overwrite, resume_hint=""):
    """Before any work: refuse to replace an earlier run's files unless --overwrite, make sure
    their folder can be written, and clear temporary files a killed run left behind."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} is from an earlier run and would be replaced: {resume_hint}pass "
                        "--overwrite to start over, or another output path")
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        created = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}.tmp")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror}): choose another output path") from None
        if created:
            os.rmdir(folder)  # made again with the first file saved: a failed run leaves no empty folder
    for stale in (s for p in paths for s in glob(escape(p) + ".*.tmp")):
        os.remove(stale)  # half a file from a run that was killed while saving


def read_checkpoint(path, what, missing, needs=("config", "model"), mmap=False):
    """A .pt the scripts wrote -> its dict (weights only: never runs code); else one line saying so.
    mmap: read each tensor from the file only when used (for a look at a few of its values)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        assert isinstance(ckpt, dict) and set(needs) <= set(ckpt)
    except Exception:
        raise UserError(f"{path} is not {what} of this project") from None
    return ckpt


def lock_file(path):
    """One process at a time writes path (the judge's scores): a second gets one line."""
    from filelock import FileLock, Timeout

    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{path} is being written by a run that has not ended: wait for it, or score a "
                        "copy") from None
    LOCKS.append(lock)


LOCKS, LOCKED = [], []  # held until the process ends (the kernel lets go even after a kill -9); their folders


def lock_out_dir(folder):
    """One run at a time writes into folder: a second one gets a line naming the first's process, and
    touches none of its files. Under torchrun the first process holds it for all."""
    if os.environ.get("RANK", "0") != "0":
        return
    from filelock import FileLock, Timeout

    lock, owner = FileLock(os.path.join(folder, ".lock")), os.path.join(folder, ".lock.pid")
    try:
        os.makedirs(folder, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        try:
            with open(owner) as f:
                pid = f"process {int(f.read())}"
        except (OSError, ValueError):
            pid = "another process"
        raise UserError(f"{folder} is in use by a run that has not ended ({pid}): wait for it, or choose "
                        "another --out-dir") from None
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}): choose another output path") from None
    with open(owner, "w") as f:
        f.write(str(os.getpid()))
    LOCKS.append(lock)
    LOCKED.append(folder)
    atexit.register(remove_if_unused, folder)


def remove_if_unused(folder):
    """A run that ended before writing anything leaves no folder behind (only its lock was there)."""
    try:
        if set(os.listdir(folder)) <= {".lock", ".lock.pid"}:
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
    except OSError:
        pass
