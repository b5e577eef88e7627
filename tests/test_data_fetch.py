"""The tests' own data: where no folder holds it, the project's conftest.py fetches the same public files
once with the project's download code. Tested against a server on 127.0.0.1 that holds them at their
public addresses (GPT2_DATA_MIRROR)."""

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from http.server import BaseHTTPRequestHandler

import conftest as data  # the project's conftest.py: where the real data is, and how it is fetched
from tests.helpers import DATA, ROOT, free_port, reply


class Mirror(BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}, recording each request."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        reply(self, body)

    def log_message(self, *args):
        pass


def mirror_files():
    """Every public address, as a path on the mirror, with the real file (the SMS collection zipped, as UCI
    has it)."""
    files = {}
    for name, url in data.DATA_FILES.items():
        body = (DATA / name).read_bytes()
        if url.endswith(".zip"):
            archive = io.BytesIO()
            with zipfile.ZipFile(archive, "w") as z:
                z.writestr("SMSSpamCollection", body)
                z.writestr("readme", "the collection's own readme")
            body = archive.getvalue()
        files["/" + url.removeprefix("https://")] = body
    return files


def test_missing_data_is_fetched_once_into_the_cache(tmp_path, serve):
    server = serve(Mirror, files=mirror_files(), requests=[])
    cache = tmp_path / "cache"
    data.fetch_data(cache, server.url)
    for name in data.DATA_FILES:
        assert (cache / name).read_bytes() == (DATA / name).read_bytes(), name
    for name, url in data.TIKTOKEN_FILES.items():  # tiktoken's cache: its own name for each BPE file
        cached = cache / "tiktoken-cache" / hashlib.sha1(url.encode()).hexdigest()
        assert cached.read_bytes() == (DATA / "tiktoken-cache" / cached.name).read_bytes() == (
            DATA / "gpt2-124M" / name).read_bytes()
    assert len(server.requests) == len(data.DATA_FILES) and not data.missing(cache)
    data.fetch_data(cache, server.url)
    assert len(server.requests) == len(data.DATA_FILES)  # everything there already: nothing asked again
    assert not [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp"))]


def test_the_tests_run_on_fetched_data_and_offline_say_what_they_need(tmp_path, serve):
    """pytest where no data folder is: conftest.py fetches through the mirror, and tests that read the real
    124M folder and tiktoken's files pass; with nothing to fetch from, pytest stops with one line."""
    server = serve(Mirror, files=mirror_files(), requests=[])
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    env.update(GPT2_DATA=str(tmp_path / "nowhere"), GPT2_DATA_CACHE=str(tmp_path / "cache"),
               GPT2_DATA_MIRROR=server.url)
    tests = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
             str(ROOT / "test_gpt2.py"), "-k", "missing_weights_file or known_ids"]
    r = subprocess.run(tests, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(server.requests) == len(data.DATA_FILES) and not data.missing(tmp_path / "cache")
    env.update(GPT2_DATA_CACHE=str(tmp_path / "empty"), GPT2_DATA_MIRROR=f"http://127.0.0.1:{free_port()}")
    r = subprocess.run(tests, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    said = [line for line in (r.stdout + r.stderr).splitlines() if "the tests read real data" in line]
    assert r.returncode == 1 and len(said) == 1 and "the-verdict.txt, tinyshakespeare.txt" in said[0] \
           and "connect to the internet once, put the files in data/" in said[0] \
           and "or set GPT2_DATA to a folder that holds them" in said[0]
    assert "Traceback" not in r.stdout + r.stderr


def test_the_projects_own_data_and_models_folders_are_found(tmp_path, monkeypatch):
    """No GPT2_DATA folder: the files the scripts downloaded into the project's data/ and models/124M/ are
    what the tests read (linked into the cache), and nothing is left to fetch."""
    project = tmp_path / "project"
    for name in data.DATA_FILES:
        openai = name.startswith("gpt2-124M/")
        place = project / ("models/124M/" + name.split("/")[1] if openai else "data/" + name)
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes((DATA / name).read_bytes())
    monkeypatch.setattr(data, "ROOT", project)
    monkeypatch.setenv("GPT2_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GPT2_DATA_CACHE", str(tmp_path / "cache"))
    found = data.find_data()
    assert found == tmp_path / "cache" and not data.missing(found)
    assert (found / "gpt2-124M" / "vocab.bpe").resolve() == project / "models" / "124M" / "vocab.bpe"
    spam = "sms-spam/SMSSpamCollection"
    assert (found / spam).read_bytes() == (DATA / spam).read_bytes()
