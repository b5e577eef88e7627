"""Where the tests find the real data they read, in this order: the folder GPT2_DATA names (default
../shared/data, beside the project) when it holds every file; else the files of it there are, those the
project's own data/ holds (where the scripts download them) and OpenAI's small 124M files in models/124M/
(download_weights.py's), gathered in a cache folder (GPT2_DATA_CACHE, default ~/.cache/gpt2-tests); what is
still missing is fetched into the cache once, with the project's own download code, when pytest starts.
Offline and without them, pytest stops with one line that names every missing file.
GPT2_DATA_MIRROR, if set, replaces https:// in every address (a local mirror, or the tests' own server)."""

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2"
RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
DATA_FILES = {  # path in the data folder: where it is published
    "the-verdict.txt": f"{RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
    "tinyshakespeare.txt":
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "instruction-data.json": f"{RASBT}/ch07/01_main-chapter-code/instruction-data.json",
    "sms-spam/SMSSpamCollection":
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",  # in it
    **{f"gpt2-124M/{name}": f"{OPENAI}/models/124M/{name}"  # the small files only: no 500 MB of weights
       for name in ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.index", "model.ckpt.meta",
                    "vocab.bpe")},
}
# tiktoken's cache holds GPT-2's two BPE files under the sha1 of the address it would download each from.
TIKTOKEN_FILES = {name: f"{OPENAI}/encodings/main/{name}" for name in ("encoder.json", "vocab.bpe")}


def missing(folder):
    return [name for name in DATA_FILES if not (folder / name).is_file()]


def in_the_project(name):
    """Where the project's own scripts put a data file: data/<name>, OpenAI's in models/124M/."""
    if name.startswith("gpt2-124M/"):
        return ROOT / "models" / "124M" / name.split("/")[1]
    return ROOT / "data" / name


def gather(cache, sources):
    """Link into cache each file it lacks that a folder of sources holds (as the project lays it out, or
    as the data folder does)."""
    for name in missing(cache):
        found = [p for p in (*(folder / name for folder in sources), in_the_project(name)) if p.is_file()]
        if found:
            os.makedirs((cache / name).parent, exist_ok=True)
            os.symlink(found[0].resolve(), cache / name)


def fetch_data(folder, mirror=None):
    """Download the DATA_FILES folder lacks into it, each file whole or not at all, and fill its
    tiktoken-cache/ from the BPE files."""
    # the project's own: resumes, retries, renames a file only when whole
    from fetch import download
    from files import replaced

    for name in missing(folder):
        url = (DATA_FILES[name] if not mirror
               else DATA_FILES[name].replace("https://", mirror.rstrip("/") + "/"))
        if url.endswith(".zip"):
            with tempfile.TemporaryDirectory() as tmp:
                archive = download(url, os.path.join(tmp, "archive.zip"))
                with zipfile.ZipFile(archive) as z:
                    z.extract(Path(name).name, tmp)
                os.makedirs(folder / Path(name).parent, exist_ok=True)
                shutil.move(os.path.join(tmp, Path(name).name), folder / name)
        else:
            download(url, str(folder / name))
    for name, url in TIKTOKEN_FILES.items():
        cached = folder / "tiktoken-cache" / hashlib.sha1(url.encode()).hexdigest()
        if not cached.is_file():
            os.makedirs(cached.parent, exist_ok=True)
            with replaced(str(cached)) as tmp:
                shutil.copyfile(folder / "gpt2-124M" / name, tmp)


def find_data():
    """The folder the tests read, as the module's docstring says (without fetching yet)."""
    folder = Path(os.environ.get("GPT2_DATA", ROOT.parent / "shared" / "data")).resolve()
    if not missing(folder):
        return folder
    cache = Path(os.environ.get("GPT2_DATA_CACHE", Path.home() / ".cache" / "gpt2-tests")).resolve()
    gather(cache, [folder])
    return cache


DATA = find_data()
os.environ["GPT2_DATA"] = str(DATA)  # before any test module or tests/helpers.py reads it
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "tiktoken-cache"))  # tiktoken's gpt2 files, offline
# One thread per test process, and the processes (xdist's workers, one per core, and the scripts they
# start) share the cores: several threads each would wait on one another (the figures are bench.py's).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config):
    """-n auto: one test process more than the cores; many tests wait on a script they started, whose
    process has the core meanwhile."""
    return (os.cpu_count() or 1) + 1


def pytest_configure(config):
    """Fetch what no folder holds, once, before the first test (in the main process, not in xdist's
    workers)."""
    if hasattr(config, "workerinput") or (not missing(DATA) and (DATA / "tiktoken-cache").is_dir()):
        return
    lacking = missing(DATA)
    try:
        fetch_data(DATA, os.environ.get("GPT2_DATA_MIRROR"))
    except Exception as e:
        pytest.exit(f"error: the tests read real data that no folder here holds ({', '.join(lacking)}) and "
                    f"fetching it into {DATA} failed ({' '.join(str(e).split())}): connect to the internet "
                    "once, put the files in data/ (OpenAI's in models/124M/: python download_weights.py), "
                    "or set GPT2_DATA to a folder that holds them", returncode=1)
