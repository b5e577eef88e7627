"""Where the tests find the real data they read: the folder GPT2_DATA names (default ../shared/data,
beside the project). Where that folder lacks a file, the tests fetch the same public files once into a
cache (GPT2_DATA_CACHE, default ~/.cache/gpt2-tests) with the project's own download code, then read
them there; offline and without them, pytest stops with one line that says what is needed. This runs
when pytest loads this file, before the tests' own conftest.py and any test module read GPT2_DATA.
GPT2_DATA_MIRROR, if set, replaces https:// in every address (a local mirror, or the tests' own server)."""

import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

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


def use_real_data():
    """Point GPT2_DATA (and tiktoken's cache) at a folder that holds every file, fetching them if need be:
    before any test module or the tests' own conftest.py is imported."""
    folder = Path(os.environ.get("GPT2_DATA", ROOT.parent / "shared" / "data")).resolve()
    if missing(folder):
        cache = Path(os.environ.get("GPT2_DATA_CACHE", Path.home() / ".cache" / "gpt2-tests")).resolve()
        try:
            fetch_data(cache, os.environ.get("GPT2_DATA_MIRROR"))
        except Exception as e:
            sys.exit(f"error: the tests read real data that {folder} lacks "
                     f"({', '.join(missing(folder)[:3])}, ...) and fetching it into {cache} failed "
                     f"({' '.join(str(e).split())[:200]}): connect to the internet once, or set GPT2_DATA to "
                     "a folder that holds it")
        folder = cache
    os.environ["GPT2_DATA"] = str(folder)
    # tiktoken's gpt2 files, offline
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(folder / "tiktoken-cache"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve())


use_real_data()
