"""The token cache of a corpus: a text file, or a folder of .txt files, tokenized once into shards of uint16
ids beside it (<data>.tokens/: shard_00000.bin, ... and manifest.json), then read lazily as one sequence.

The text is read in pieces of about CHUNK_CHARS characters, cut only where GPT-2's pre-tokenizer never joins
across (the tokens are exactly tiktoken's of each whole file), and encoded by worker processes (one per core),
as build-nanogpt's fineweb.py does. manifest.json records each file's size and modification time: a changed
or added file is tokenized again from it on, the files before it are kept. Links to files are read; links to
folders are not followed (one that points back up would read the same files again and again).

Several processes may share a cache (two runs, torchrun's ranks): one prepares it at a time, under a lock
(<data>.tokens.lock), into new files renamed into place only when whole, so a run reading the cache never
sees a shard change under it. A damaged cache (a manifest that does not describe its shards) is rebuilt.

    python train.py --data corpus/ --prepare-only     # prepare the cache of corpus/, print its tokens, exit
"""

import bisect
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from glob import glob

import numpy as np

from cli import progress_bar
from errors import UserError
from files import write_json

CHUNK_CHARS = 1 << 20  # characters read and encoded at a time: preparation holds a few pieces per worker
WORKERS = os.cpu_count() or 1  # processes that tokenize
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB of uint16), as build-nanogpt's FineWeb shards


def text_files(path):
    """A text file, or the .txt files anywhere under a folder, sorted by path (see the module's docstring on
    links)."""
    if os.path.isdir(path):
        walk = list(os.walk(path))  # os.walk does not follow links to folders
        files = sorted(os.path.join(folder, name) for folder, _, names in walk for name in names
                       if name.endswith(".txt"))
        if not files:
            raise UserError(f"no .txt files in {path}: --data takes a text file or a folder of .txt files")
        for f in files:
            if os.path.exists(f) and not os.path.isfile(f):
                raise UserError(f"{f} is not a regular file (a device, a pipe or a socket): remove it from "
                                f"{path}, or rename it so that it does not end in .txt")
            if not os.path.isfile(f):
                raise UserError(f"{f} is a link to nothing: remove it, or point it at a text file")
        links = [os.path.join(folder, d) for folder, dirs, _ in walk for d in dirs
                 if os.path.islink(os.path.join(folder, d))]
        if links:
            print(f"links to folders are not followed: {', '.join(links[:3])}"
                  + (", ..." if len(links) > 3 else ""),
                  file=sys.stderr)
        return files
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file (a device, a pipe or a socket): --data takes a text "
                        "file or a folder of .txt files")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data takes a text file or a folder of .txt files")
    return [path]


def cut_point(text):
    """The last place text can be cut without changing its tokens, 0 if none: before a newline or
    space that precedes a letter or digit. GPT-2's pre-tokenizer never joins across it (the space
    or newline starts a piece of its own or the next word's; whitespace before it ends a piece
    either way), so encode(a) + encode(b) == encode(a + b)."""
    for sep in "\n ":
        i = len(text)
        while (i := text.rfind(sep, 0, i)) > 0:
            if text[i + 1:i + 2].isalnum():
                return i
    return 0


def read_pieces(files):
    """((file index, is its last piece), text) for pieces of about CHUNK_CHARS characters of each file
    in turn: a file is never held whole, and its pieces encode to exactly the file's tokens."""
    for n, f in enumerate(files):
        try:
            with open(f, encoding="utf-8") as fh:  # text mode decodes characters split between reads
                text = ""
                while block := fh.read(CHUNK_CHARS):
                    text += block
                    # a shorter block ends the file
                    if len(block) == CHUNK_CHARS and (cut := cut_point(text)):
                        yield (n, False), text[:cut]
                        text = text[cut:]
                yield (n, True), text
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None


# -----------------------------------------------------------------------------
# Encoding in worker processes.

worker_tokenizer = None  # in a worker process: the tokenizer it encodes with


def start_worker(tokenizer, parent):
    global worker_tokenizer
    worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's Pool.terminate(): end at once, quietly
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # (held while it forked)
    threading.Thread(target=end_with, args=(parent,), daemon=True).start()


def end_with(parent):
    """A worker's watch: once its parent is gone (killed with SIGKILL, say) it ends too, not working on
    alone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def encode_piece(text, tokenizer=None):
    """text -> (its ids as uint16, its size in bytes), with tokenizer or else the worker's."""
    ids = (tokenizer or worker_tokenizer).encode(text)
    return np.array(ids, dtype=np.uint16), len(text.encode())  # 16 bits hold GPT-2's 50,257 ids


def encode_in_order(tokenizer, pieces, workers):
    """(tag, encode_piece(text)) for each (tag, text) of pieces, in order. With workers > 1 that many
    processes encode, each a piece at a time, and at most 2 x workers pieces are read ahead (threads,
    though tiktoken lets go of the GIL, scaled half as well: 16 reached 4x one, 16 processes 9x);
    with 1, this process encodes. The workers end with the pool, however it ends (an error, Ctrl-C,
    SIGTERM)."""
    if workers == 1:
        for tag, text in pieces:
            yield tag, encode_piece(text, tokenizer)
        return
    # A Ctrl-C or SIGTERM in the middle of a fork would raise inside fork's own handlers (filelock has
    # some), where Python only prints it and goes on: held until the workers are started.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pool = multiprocessing.Pool(workers, initializer=start_worker, initargs=(tokenizer, os.getpid()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    with pool:
        pending = deque()
        for tag, text in pieces:
            pending.append((tag, pool.apply_async(encode_piece, (text,))))
            if len(pending) > 2 * workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        for tag, result in pending:
            yield tag, result.get()


# -----------------------------------------------------------------------------
# The cache: shards of ids, the manifest that describes them, and the lock.


def shard_path(cache, i):
    return os.path.join(cache, f"shard_{i:05d}.bin")


@contextlib.contextmanager
def cache_lock(cache, exclusive):
    """Hold <cache>.lock (filelock's) while a process reads the manifest and maps the shards, or prepares
    them: one process at a time, the others wait. The system releases it when the process ends, however it
    ends."""
    from filelock import FileLock, Timeout

    lock = FileLock(cache + ".lock")
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process to finish preparing {cache}", file=sys.stderr)
            lock.acquire()
    except OSError as e:
        if exclusive:
            raise UserError(f"cannot write the token cache {cache} ({e.strerror}): put --data in a folder "
                            "you can write") from None
        yield  # a cache in a folder that cannot be written cannot be prepared either: nothing to wait for
        return
    try:
        yield
    finally:
        lock.release()


def read_manifest(cache):
    """-> (the cache's manifest if it is there and describes the shards as they are, else None; what is wrong
    with it, for a damaged cache: a valid JSON of the wrong shape, a shard missing or cut short)."""
    path = os.path.join(cache, "manifest.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files, shards = manifest["files"], manifest["shards"]
        if not (isinstance(manifest["separator"], bool) and isinstance(files, list)
                and isinstance(shards, list)):
            raise TypeError("separator, files or shards of the wrong kind")
        for f in files:
            if not (isinstance(f["path"], str)
                    and all(type(f[k]) is int for k in ("bytes", "mtime_ns", "tokens"))):
                raise TypeError(f"the entry {str(f)[:60]}")
        if (not all(type(n) is int and n >= 0 for n in shards)
                or sum(shards) != sum(f["tokens"] for f in files)):
            raise ValueError("the shards' sizes do not add up to the files' tokens")
        for i, n in enumerate(shards):
            if os.path.getsize(shard_path(cache, i)) != 2 * n:
                raise ValueError(f"{shard_path(cache, i)} does not hold the {n:,} ids it should")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, (f"the token cache {cache} is damaged ({' '.join(str(e).split())[:150]}): "
                      "tokenizing again")
    return manifest, None


def unchanged_files(manifest, sources):
    """How many of the first files are as the manifest recorded them: same path, size and modification
    time."""
    if not manifest or manifest["separator"] != sources["separator"]:
        return 0
    n = 0
    for old, new in zip(manifest["files"], sources["files"]):
        if any(old[k] != new[k] for k in ("path", "bytes", "mtime_ns")):
            break
        n += 1
    return n


class ShardWriter:
    """Appends token ids to new shard files (temporary names until replace_shards), SHARD_TOKENS to a
    file, after the tokens of the shards kept: sizes, of which the last may be only partly kept."""

    def __init__(self, cache, sizes):
        self.cache, self.sizes, self.written = cache, sizes, []
        if sizes and sizes[-1] < SHARD_TOKENS:  # the last shard kept only in part: copied, then added to
            self.start(len(sizes) - 1)
            np.memmap(shard_path(cache, len(sizes) - 1), dtype=np.uint16, mode="r",
                      shape=(sizes[-1],)).tofile(self.temporary(len(sizes) - 1))

    def temporary(self, i):
        return f"{shard_path(self.cache, i)}.{os.getpid()}.tmp"

    def start(self, i):
        self.written.append(i)
        open(self.temporary(i), "wb").close()

    def write(self, ids):
        while len(ids):
            if not self.sizes or self.sizes[-1] >= SHARD_TOKENS:
                self.sizes.append(0)
                self.start(len(self.sizes) - 1)
            n = min(len(ids), SHARD_TOKENS - self.sizes[-1])
            with open(self.temporary(len(self.sizes) - 1), "ab") as f:
                ids[:n].tofile(f)
            self.sizes[-1] += n
            ids = ids[n:]

    def discard(self):
        """Remove the shards written so far: the cache stays as it was."""
        for i in self.written:
            if os.path.exists(self.temporary(i)):
                os.remove(self.temporary(i))

    def replace_shards(self):
        """Every shard written, renamed into place (a run that has the old one mapped keeps reading it)."""
        for i in self.written:
            os.replace(self.temporary(i), shard_path(self.cache, i))
        for stale in set(glob(os.path.join(self.cache, "shard_*.bin"))) - {
                shard_path(self.cache, i) for i in range(len(self.sizes))}:
            os.remove(stale)  # a shard of an earlier, longer corpus


def prepare(files, sources, cache, old, keep, tokenizer, workers):
    """Tokenize files[keep:] into new shards after the tokens of files[:keep] (recorded in the old manifest),
    then put them and the manifest in place -> the manifest. Called under the cache's exclusive lock."""
    counts = [f["tokens"] for f in old["files"][:keep]] if keep else []  # each file's tokens
    kept, sizes = sum(counts), []
    for n in old["shards"] if keep else []:  # the shards holding the kept tokens, the last one cut to them
        if sum(sizes) == kept:
            break
        sizes.append(min(n, kept - sum(sizes)))
    try:
        os.makedirs(cache, exist_ok=True)
        for stale in glob(os.path.join(cache, "*.tmp")):
            os.remove(stale)  # from a preparation that was killed
        writer = ShardWriter(cache, sizes)
    except OSError as e:
        raise UserError(f"cannot write the token cache {cache} ({e.strerror}): put --data in a folder "
                        "you can write") from None

    counts += [0] * (len(files) - keep)
    eot = np.array([tokenizer.eot_id], dtype=np.uint16)
    t0, total = time.time(), sum(f["bytes"] for f in sources["files"][keep:])
    # no more than there are pieces: one file of 20 kB needs none
    workers = min(workers, 1 + total // CHUNK_CHARS)
    try:
        with progress_bar(total=total, unit="B", unit_scale=True, desc="tokenizing", delay=1) as bar:
            for (n, last), (ids, size) in encode_in_order(tokenizer, read_pieces(files[keep:]), workers):
                writer.write(ids)
                counts[keep + n] += len(ids)
                if last and sources["separator"]:
                    writer.write(eot)
                    counts[keep + n] += 1
                bar.update(size)
    except OSError as e:  # numpy says a full disk as "N requested and M written"
        writer.discard()
        free = shutil.disk_usage(cache).free
        raise UserError(f"cannot write the token cache {cache} ({e}): its disk has {free / 2**20:,.0f} MB "
                        "free; free some space, or put --data on another disk, and run again") from None
    manifest = {**sources, "files": [{**f, "tokens": c} for f, c in zip(sources["files"], counts)],
                "shards": writer.sizes, "tokens": sum(counts)}
    if os.path.exists(os.path.join(cache, "manifest.json")):
        os.remove(os.path.join(cache, "manifest.json"))  # shards without a manifest are never trusted
    writer.replace_shards()
    write_json(manifest, os.path.join(cache, "manifest.json"))
    dt, new = time.time() - t0, sum(counts) - kept
    print(f"tokenized {len(files) - keep} of {len(files)} file(s), {total / 1e6:,.1f} MB, into {new:,} "
          f"tokens in {dt:.1f} s ({new / max(dt, 1e-9):,.0f} tokens/s, {workers} worker(s)): {cache}")
    return manifest


class Tokens:
    """The ids in a cache's shards as one sequence, memory-mapped: tokens[a:b] reads just those from disk,
    each id checked against the vocabulary (a bit flipped on disk names its shard)."""

    def __init__(self, cache, sizes, vocab_size):
        self.cache, self.vocab_size = cache, vocab_size
        self.shards = [np.memmap(shard_path(cache, i), dtype=np.uint16, mode="r", shape=(n,))
                       for i, n in enumerate(sizes)]
        self.starts = np.cumsum([0, *sizes]).tolist()  # where each shard begins in the sequence

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, s):
        begin, end, _ = s.indices(len(self))
        parts, i = [], bisect.bisect_right(self.starts, begin) - 1
        while begin < end:  # a window may run over from one shard into the next
            take = min(end, self.starts[i + 1])
            parts.append(self.shards[i][begin - self.starts[i]:take - self.starts[i]])
            if parts[-1].max() >= self.vocab_size:
                raise UserError(f"{shard_path(self.cache, i)} holds the id {parts[-1].max()}, past the "
                                f"vocabulary's {self.vocab_size:,}: the token cache is damaged; delete "
                                f"{self.cache} and run again (it is rebuilt)")
            begin, i = take, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_tokens(path, tokenizer, workers=WORKERS):
    """All of path's text as GPT-2 token ids (Tokens: read lazily), each document of a folder followed
    by <|endoftext|>. They are cached in <path>.tokens/: shards of uint16 and manifest.json, which
    records each file's size and modification time, so that changed or added files are tokenized again."""
    files, cache = text_files(path), os.path.normpath(path) + ".tokens"
    root = path if os.path.isdir(path) else os.path.dirname(path)
    stats = [(os.path.relpath(f, root), os.stat(f)) for f in files]
    # a folder's documents end with <|endoftext|>, a single file does not
    sources = {"separator": os.path.isdir(path),
               "files": [{"path": p, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in stats]}
    for exclusive in (False, True):  # a look under a shared lock; if the cache is out of date, prepare it
        with cache_lock(cache, exclusive):
            manifest, damage = read_manifest(cache)  # (again under the exclusive lock: another process may
            keep = unchanged_files(manifest, sources)  # have prepared it meanwhile)
            if manifest and keep == len(files) == len(manifest["files"]):
                return Tokens(cache, manifest["shards"], tokenizer.enc.n_vocab)
            if exclusive:
                if damage:
                    print(damage, file=sys.stderr)
                manifest = prepare(files, sources, cache, manifest, keep, tokenizer, workers)
                return Tokens(cache, manifest["shards"], tokenizer.enc.n_vocab)
