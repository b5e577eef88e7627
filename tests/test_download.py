"""Downloads: fetch.download and download_weights.py against a server on 127.0.0.1, and Hugging Face
GPT-2 folders in and out (download_weights.py --export-hf, the conversion of OpenAI's checkpoint)."""

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

import download_weights
import fetch
from errors import UserError
from fetch import download
from files import save_atomic
from gpt2 import GPT, GPTConfig, Tokenizer
from tests.helpers import (DATA, OPENAI_124M, ROOT, TENSORFLOW, TINY, free_port, hf_twin, one_line_error,
                           real_index, reply, snapshot, tiny_model, write_openai_checkpoint)

# -----------------------------------------------------------------------------
# download_weights.py and fetch.download, against a server on 127.0.0.1


class _DlHandler(BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}, honouring "Range: bytes=N-" unless server.ignore_range, with the
    headers the Hugging Face Hub sends (huggingface_hub's HEAD request reads X-Repo-Commit, server.commit,
    and ETag). A path in
    server.cut_once is sent only half through, once: the connection drops mid-file. server.portal, when set,
    is an HTML page answered to every request with status 200, as a captive portal does."""

    def do_GET(self):
        self.answer(send_body=True)

    def do_HEAD(self):
        self.answer(send_body=False)

    def answer(self, send_body):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")) if send_body else ("HEAD", self.path))
        if srv.portal is not None:
            reply(self, srv.portal if send_body else b"", content_type="text/html; charset=utf-8")
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("X-Repo-Commit", srv.commit)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.end_headers()
        if not send_body:
            return
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):  # keep the test output quiet
        pass


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the revision a test server says it serves
PORTAL_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Accept the terms</body>"


@pytest.fixture
def dl_server(serve):
    return serve(_DlHandler, files={}, requests=[], cut_once=set(), ignore_range=False, portal=None,
                 commit=HUB_COMMIT)


@pytest.fixture
def dl_no_wait(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_WAIT", 0.0)


def _dl_release(size):
    """The files of a release as the server holds them: the real tokenizer files, checkpoint list and
    meta graph, and for 124M the real index and hparams.json; for other sizes a tiny real checkpoint
    (which the download then converts); anything else (124M's data file) is made-up bytes."""
    real = {name: (DATA / "gpt2-124M" / name).read_bytes()
            for name in ("encoder.json", "vocab.bpe", "checkpoint", "model.ckpt.meta")}
    if size == "124M":
        real |= {name: (DATA / "gpt2-124M" / name).read_bytes()
                 for name in ("hparams.json", "model.ckpt.index")}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = write_openai_checkpoint(Path(tmp), hf_twin(tiny_model()), n_ctx=TINY["n_ctx"])
            real |= {name: (tiny / name).read_bytes() for name in ("hparams.json", "model.ckpt.index",
                                                                   "model.ckpt.data-00000-of-00001")}
    fake = {name: os.urandom(1000 + 37 * i) for i, name in enumerate(download_weights.FILES)}
    return {f"/{size}/{name}": real.get(name, fake[name]) for name in download_weights.FILES}


@TENSORFLOW
def test_dl_sizes_table_is_true():
    """The published sizes: 124M's small files against the real ones in shared/data, its data file
    against 4 bytes per float32 that the real index lists, and 355M's data file likewise from its shape."""
    for sizes in download_weights.PUBLISHED.values():
        assert set(sizes) <= set(download_weights.FILES)
    assert set(download_weights.PUBLISHED) == {"124M", "355M", "774M", "1558M"}
    table = {**download_weights.SAME_FOR_ALL, **download_weights.PUBLISHED["124M"]}
    data = "model.ckpt.data-00000-of-00001"
    for name in set(download_weights.FILES) - {data}:
        assert (OPENAI_124M / name).stat().st_size == table[name], name
    assert table[data] == 4 * sum(math.prod(shape) for shape in real_index().values()) == 497_759_232
    # tied head
    n_355m = sum(p.numel()
                 for p in GPT.empty(GPTConfig.from_name("355M")).state_dict().values()) - 50257 * 1024
    assert download_weights.PUBLISHED["355M"][data] == 4 * n_355m


def test_dl_interrupted_transfer_resumes_with_range(dl_server, dl_no_wait, tmp_path, monkeypatch, capsys):
    """124M with the real small files (only the data file's published size is shrunk to a fake
    one): model.ckpt.meta drops half way, the retry asks for the rest and the file comes out whole."""
    dl_server.files = _dl_release("124M")
    data = "model.ckpt.data-00000-of-00001"
    monkeypatch.setitem(download_weights.PUBLISHED, "124M",
                        {**download_weights.PUBLISHED["124M"], data: len(dl_server.files[f"/124M/{data}"])})
    dl_server.cut_once = {"/124M/model.ckpt.meta"}
    monkeypatch.setattr(download_weights, "convert", lambda folder: None)  # the data file is made up
    monkeypatch.setattr(sys, "argv", ["download_weights.py", "--model", "gpt2",
                                      "--models-dir", str(tmp_path), "--base-url", dl_server.url])
    download_weights.main()
    for path, body in dl_server.files.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body, path
    meta_requests = [r for p, r in dl_server.requests if p == "/124M/model.ckpt.meta"]
    assert len(meta_requests) == 2 and meta_requests[0] is None
    resumed_at = int(meta_requests[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(dl_server.files["/124M/model.ckpt.meta"]) // 2  # the bytes it had kept
    assert "retry 1/2" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.part"))


def half_then_whole(dl_server, tmp_path):
    """A 300 kB file that the server sends only half of the first time -> (its bytes, where it goes)."""
    body = os.urandom(300_000)
    dl_server.files, dl_server.cut_once = {"/f": body}, {"/f"}
    return body, str(tmp_path / "f")


def test_dl_cut_then_next_run_resumes(dl_server, dl_no_wait, tmp_path):
    """A run that gives up leaves its .part; the next run fetches only the missing bytes."""
    body, dest = half_then_whole(dl_server, tmp_path)
    with pytest.raises(UserError, match="run again"):
        download(dl_server.url + "/f", dest, size=len(body), retries=1)
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept <= len(body) // 2 and not os.path.exists(dest)
    download(dl_server.url + "/f", dest, size=len(body), retries=1)
    assert Path(dest).read_bytes() == body and not os.path.exists(dest + ".part")
    assert dl_server.requests[-1] == ("/f", f"bytes={kept}-")


def test_dl_server_ignoring_range_starts_over(dl_server, dl_no_wait, tmp_path):
    body, dest = half_then_whole(dl_server, tmp_path)
    dl_server.ignore_range = True
    download(dl_server.url + "/f", dest)  # no size given: the server's Content-Length is checked
    assert Path(dest).read_bytes() == body
    assert len(dl_server.requests) == 2 and dl_server.requests[1][1].startswith("bytes=")  # asked, got 200


def test_dl_unknown_size_checked_against_content_length(dl_server, dl_no_wait, tmp_path):
    _, dest = half_then_whole(dl_server, tmp_path)
    with pytest.raises(UserError, match="could not download"):
        download(dl_server.url + "/f", dest, retries=1)
    assert not os.path.exists(dest)


def test_dl_whole_part_is_renamed_without_a_request(dl_server, tmp_path):
    dest = tmp_path / "f"
    Path(str(dest) + ".part").write_bytes(b"x" * 100)
    download(dl_server.url + "/f", str(dest), size=100)
    assert dest.read_bytes() == b"x" * 100 and dl_server.requests == []


def test_dl_ensure_file(dl_server, dl_no_wait, tmp_path):
    dl_server.files = {"/f": b"hello"}
    path = tmp_path / "sub" / "f"
    assert fetch.ensure_file(str(path), dl_server.url + "/f") == str(path) and path.read_bytes() == b"hello"
    n = len(dl_server.requests)
    fetch.ensure_file(str(path), dl_server.url + "/f")  # there already: no request
    assert len(dl_server.requests) == n
    n = len(dl_server.requests)
    with pytest.raises(UserError, match="answered HTTP 404 Not Found: no such file there"):
        fetch.ensure_file(str(tmp_path / "g"), dl_server.url + "/missing")  # 404: not a connection problem
    assert len(dl_server.requests) == n + 1  # asked once, not retried
    assert not list(tmp_path.glob("g*"))


@TENSORFLOW
def test_dl_script_downloads_then_skips(dl_server, tmp_path, run_main):
    """774M: the tokenizer files are checked against their published sizes, the rest against
    Content-Length, and the checkpoint is converted; a second run requests and converts nothing."""
    dl_server.files = _dl_release("774M")
    args = ["--model", "gpt2-large", "--models-dir", tmp_path, "--base-url", dl_server.url]
    r = run_main("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    for path, body in dl_server.files.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body, path
    assert "converting" in r.stdout and download_weights.converted(tmp_path / "774M")
    converted = snapshot(tmp_path / "774M")
    n = len(dl_server.requests)
    r = run_main("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("complete, skipped") == 7 and len(dl_server.requests) == n
    assert "converted already, skipped" in r.stdout and snapshot(tmp_path / "774M") == converted


@TENSORFLOW
def test_dl_script_refuses_wrong_size(dl_server, tmp_path, run_main):
    dl_server.files = _dl_release("774M")
    dl_server.files["/774M/vocab.bpe"] = dl_server.files["/774M/vocab.bpe"][:-10]  # truncated on the server
    r = run_main("download_weights.py", "--model", "774M", "--models-dir", tmp_path,
                 "--base-url", dl_server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # above it: the progress bars of the files before
    assert last.startswith("error: ") and "published size is 456,318" in last
    folder = tmp_path / "774M"
    assert not (folder / "vocab.bpe").exists() and not (folder / "vocab.bpe.part").exists()
    assert (folder / "encoder.json").exists()  # the files before it were fine


def test_dl_script_unreachable_server(tmp_path, run_main, dl_no_wait):
    port = free_port()
    r = run_main("download_weights.py", "--models-dir", tmp_path, "--base-url", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download") and "check your connection" in last
    assert last.endswith("or fetch the same weights from the Hugging Face Hub: --source huggingface")
    assert "(7 of the 7 files are still to fetch: checkpoint, encoder.json, hparams.json, " \
           "model.ckpt.data-00000-of-00001, model.ckpt.index, model.ckpt.meta, vocab.bpe)" in last
    assert not list(tmp_path.rglob("checkpoint*"))


def test_dl_script_unknown_model(tmp_path, run_main):
    """An unknown size is a bad flag like any other: exit 2, before any work."""
    for name in ("gpt3", "999M"):
        line = one_line_error(run_main("download_weights.py", "--model", name, "--models-dir", tmp_path),
                              code=2)
        assert f"argument --model: invalid choice: '{name}'" in line and "'gpt2-medium'" in line
    assert not list(tmp_path.iterdir())


@TENSORFLOW
def test_dl_captive_portal_page_is_never_kept_nor_skipped(dl_server, tmp_path, run_main):
    """774M publishes no sizes for most of its files: a server answering every request with an HTML page (a
    captive portal) gets nothing saved, in one line that names the Hub (as a 404 does); a page an earlier
    version kept as `checkpoint` is not taken as complete but fetched again."""
    args = ["--model", "774M", "--models-dir", tmp_path, "--base-url", dl_server.url]
    line = one_line_error(run_main("download_weights.py", *args))  # no files there at all: a 404
    assert "answered HTTP 404 Not Found" in line and line.endswith("--source huggingface")
    dl_server.portal = PORTAL_PAGE
    line = one_line_error(run_main("download_weights.py", *args))
    assert f"{dl_server.url}/774M/checkpoint answered with an HTML page" in line and "not saved" in line
    assert line.endswith("--source huggingface") and not (tmp_path / "774M").exists()
    (tmp_path / "774M").mkdir()
    (tmp_path / "774M" / "checkpoint").write_bytes(PORTAL_PAGE)
    dl_server.portal, dl_server.files = None, _dl_release("774M")
    r = run_main("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / '774M' / 'checkpoint'}: an HTML page" in r.stdout
    assert "downloading it again" in r.stdout
    assert (tmp_path / "774M" / "checkpoint").read_bytes() == dl_server.files["/774M/checkpoint"]


def test_dl_each_file_is_checked_for_what_it_must_hold(tmp_path):
    """The real files pass; each broken one is named for what it lacks, before it is renamed into place or
    skipped as complete."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 4)}, tmp_path / "model.safetensors")
    whole = (tmp_path / "model.safetensors").read_bytes()
    real = {name: (OPENAI_124M / name).read_bytes() for name in download_weights.FILES
            if (OPENAI_124M / name).exists()} | {"model.safetensors": whole}
    broken = {"checkpoint": (b"model_checkpoint_path: \"other.ckpt\"\n", "no TensorFlow checkpoint list"),
              "encoder.json": (b"[1, 2]", "JSON without GPT-2's tokens"),
              "hparams.json": (b'{"n_vocab": 50257', "holds no GPT-2 config"),
              "model.ckpt.index": (real["model.ckpt.index"][:-8], "no TensorFlow checkpoint index"),
              "vocab.bpe": ("Ġ t\n".encode(), "no BPE merges"),
              "model.safetensors": (whole[:-4], "incomplete")}
    for name, body in real.items():
        (tmp_path / name).write_bytes(body)
        assert download_weights.what_is_wrong(str(tmp_path / name)) is None, name
        (tmp_path / name).write_bytes(PORTAL_PAGE)
        assert download_weights.what_is_wrong(str(tmp_path / name)).startswith("an HTML page"), name
    for name, (body, said) in broken.items():
        (tmp_path / name).write_bytes(body)
        assert said in download_weights.what_is_wrong(str(tmp_path / name)), name


@TENSORFLOW
def test_dl_a_file_that_is_not_what_it_must_be_is_not_saved(dl_server, dl_no_wait, tmp_path, run_main):
    """774M's index (no published size) served whole but cut short by the server itself: one line, no
    model.ckpt.index and no .part left."""
    dl_server.files = _dl_release("774M")
    dl_server.files["/774M/model.ckpt.index"] = dl_server.files["/774M/model.ckpt.index"][:-100]
    line = one_line_error(run_main("download_weights.py", "--model", "774M", "--models-dir", tmp_path,
                                   "--base-url", dl_server.url))
    assert f"{dl_server.url}/774M/model.ckpt.index sent no TensorFlow checkpoint index" in line
    assert not list((tmp_path / "774M").glob("model.ckpt.index*"))


def test_dl_full_disk_stops_at_once_keeping_the_part(dl_server, dl_no_wait, tmp_path, monkeypatch):
    """A disk that fills up 100 kB into a download: one line naming the .part, no retry (it is no connection
    problem), and the .part kept: the next run resumes from it."""
    body, dest = os.urandom(300_000), tmp_path / "f"
    dl_server.files = {"/f": body}
    real_open = open

    class FillingUp:  # a file on a disk with 100 kB left
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(fetch, "open", lambda path, *a, **k: FillingUp(real_open(path, *a, **k))
                        if str(path).endswith(".part") else real_open(path, *a, **k), raising=False)
    with pytest.raises(UserError) as e:
        download(dl_server.url + "/f", str(dest))
    kept = os.path.getsize(f"{dest}.part")
    assert str(e.value) == (f"the disk is full: {dest}.part could not be written ({kept:,} bytes kept); "
                            "free some space and run again: the download resumes")
    assert 0 < kept <= 100_000 and len(dl_server.requests) == 1 and not dest.exists()
    monkeypatch.undo()
    download(dl_server.url + "/f", str(dest))
    assert dest.read_bytes() == body and dl_server.requests[-1] == ("/f", f"bytes={kept}-")


def test_dl_read_only_models_folder_is_one_line_before_any_request(dl_server, tmp_path, monkeypatch,
                                                                   run_main):
    # root writes anywhere: the read-only file system is simulated where the folder is first written
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")) if ".write-test-" in str(path)
        else real_open(path, *a, **k))
    for source in ("openai", "huggingface"):
        line = one_line_error(run_main("download_weights.py", "--models-dir", tmp_path / "models", "--source",
                                       source, "--base-url", dl_server.url))
        assert f"cannot write to {tmp_path / 'models' / '124M'} (Read-only file system)" in line
    assert dl_server.requests == [] and not (tmp_path / "models" / "124M").exists()


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 folders (config.json + model.safetensors): in and out, against transformers


def hf_logits_equal(ours, hf, vocab_size):
    idx = torch.randint(0, vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, run_main):
    """Our .pt (context 64) -> --export-hf -> transformers' own loader: the same logits, and the
    file holds the names, shapes and config that transformers' save_pretrained writes."""
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    model = tiny_model(seed=11)
    save_atomic(model.checkpoint(), str(tmp_path / "tiny.pt"))
    out = tmp_path / "hf"
    r = run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", out)
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.n_positions == 64 and hf.config.n_layer == 2
    hf_logits_equal(model, hf, TINY["vocab_size"])
    hf_twin(model).save_pretrained(tmp_path / "theirs")
    shapes = {}
    for folder in (out, tmp_path / "theirs"):
        with safe_open(folder / "model.safetensors", "pt") as f:
            shapes[folder] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes[out] == shapes[tmp_path / "theirs"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64  # n_ctx: llama.cpp's converter reads that one
    line = one_line_error(run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", out))
    assert f"{out / 'model.safetensors'} is from an earlier run and would be replaced" in line
    # read, then rewritten
    assert run_main("download_weights.py", "--export-hf", out, out, "--overwrite").returncode == 0
    hf_logits_equal(GPT.from_pretrained(str(out)), hf, TINY["vocab_size"])


@TENSORFLOW
def test_hf_converted_checkpoint_equals_the_tensorflow_one_and_loads_without_tensorflow(tmp_path):
    """OpenAI's layout, written with TensorFlow -> download_weights' conversion -> model.safetensors
    loads to bitwise the TensorFlow load's weights, in a process that never imports TensorFlow; the
    tokenizer files beside it give transformers tiktoken's ids."""
    from transformers import GPT2Tokenizer

    folder = write_openai_checkpoint(tmp_path / "124M", hf_twin(tiny_model(seed=13)), n_ctx=TINY["n_ctx"])
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(OPENAI_124M / name, folder / name)
    from_tf = GPT.from_pretrained(str(folder))
    assert not download_weights.converted(folder)
    download_weights.convert(str(folder))
    assert download_weights.converted(folder)
    from_st = GPT.from_pretrained(str(folder))
    for name, p in from_tf.state_dict().items():
        assert torch.equal(from_st.state_dict()[name], p), name
    code = ("import sys, loading; m = loading.load_model(sys.argv[1], reads_text=False); "
            "print('tensorflow' in sys.modules, sum(p.double().sum().item() for p in m.parameters()))")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", str(sum(p.double().sum().item() for p in from_tf.parameters()))]
    text = "Every effort moves you, naïvely, 1234 times!\n"
    assert GPT2Tokenizer.from_pretrained(folder).encode(text) == Tokenizer().encode(text)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-4])
    assert not download_weights.converted(folder)  # partial: download_weights.py converts again


def test_hf_bad_files_are_one_clear_line(tmp_path, run_main):
    """Each broken Hugging Face folder: sample.py stops with one line naming the file and the fault."""
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    save_atomic(tiny_model().checkpoint(), str(tmp_path / "tiny.pt"))
    assert run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", good).returncode == 0
    tensors = load_file(good / "model.safetensors")

    def broken(name, config=None, tensors_=None, data=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if config:
            (folder / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                            **config}))
        if tensors_ is not None:
            save_file(tensors_, folder / "model.safetensors")
        if data is not None:
            (folder / "model.safetensors").write_bytes(data)
        return (one_line_error(run_main("sample.py", "--model", folder, "--max-new-tokens", 1)),
                folder / "model.safetensors")

    whole = (good / "model.safetensors").read_bytes()
    line, path = broken("cut", data=whole[:len(whole) // 2])
    assert f"{path} is not a whole safetensors file" in line and "not fully covered" in line
    line, path = broken("junk", data=os.urandom(5000))
    assert f"{path} is not a whole safetensors file" in line
    line, _ = broken("llama", config={"model_type": "llama"})
    assert "config.json has model_type 'llama'; gpt2.py computes GPT-2 with 'gpt2'" in line
    line, _ = broken("relu", config={"activation_function": "relu"})
    assert "config.json has activation_function 'relu'" in line
    line, path = broken("missing",
                        tensors_={k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    assert f"{path.parent} does not fit the model: missing ['transformer.h.1.mlp.c_fc.bias'], unexpected []" \
           in line
    line, path = broken("shape",
                        tensors_={**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)})
    # the file's (in, out) (96, 32) is nn.Linear's (32, 96): the wrong way round
    assert f"transformer.h.0.attn.c_attn.weight in {path.parent} holds torch.float32 numbers of shape " \
           "[32, 96], not weights of shape [96, 32]" in line
    line, _ = broken("wider", config={"n_embd": 64})
    assert "not weights of shape" in line
    line, _ = broken("noconfig", config={"n_positions": None, "n_layer": "two"})
    assert "config.json holds no GPT-2 config" in line


def test_hf_export_full_disk_keeps_the_earlier_export(tmp_path, run_main, monkeypatch):
    """--export-hf --overwrite onto an earlier export when the disk fills up half way through
    model.safetensors: one line naming the folder, and the earlier export byte for byte, no temporary file."""
    import safetensors.torch
    from safetensors import SafetensorError

    for seed, name in ((3, "a.pt"), (4, "b.pt")):
        save_atomic(tiny_model(seed=seed).checkpoint(), str(tmp_path / name))
    out = tmp_path / "hf"
    assert run_main("download_weights.py", "--export-hf", tmp_path / "a.pt", out).returncode == 0
    before = snapshot(out)
    real = safetensors.torch.save_file

    def fills_up(tensors, path, metadata=None):  # as safetensors reports the OS's ENOSPC
        real(tensors, path, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    line = one_line_error(run_main("download_weights.py", "--export-hf", tmp_path / "b.pt", out,
                                   "--overwrite"))
    assert f"the disk is full: {out} could not be written (nothing was replaced)" in line
    assert snapshot(out) == before
    line = one_line_error(run_main("download_weights.py", "--export-hf", tmp_path / "b.pt", tmp_path / "new"))
    assert "the disk is full" in line and not (tmp_path / "new").exists()  # no empty folder left either


def test_hf_folder_without_config_json_says_what_it_needs(tmp_path, run_main):
    save_atomic(tiny_model().checkpoint(), str(tmp_path / "tiny.pt"))
    assert run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", tmp_path / "hf").returncode \
           == 0
    (tmp_path / "hf" / "config.json").unlink()
    line = one_line_error(run_main("download_weights.py", "--export-hf", tmp_path / "hf", tmp_path / "out"))
    assert f"{tmp_path / 'hf' / 'config.json'} not found: a Hugging Face folder needs the config.json that " \
           "came with its model.safetensors" in line and "--source huggingface" in line
    assert not (tmp_path / "out").exists()


def test_bad_download_leaves_no_empty_model_folder(tmp_path, run_main, dl_no_wait):
    r = run_main("download_weights.py", "--models-dir", tmp_path,
                 "--base-url", f"http://127.0.0.1:{free_port()}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: could not download") \
           and "cannot connect" in lines[-1]
    # a short line per retry, not the socket error
    assert len(lines) == 3 and all(len(line) < 60 for line in lines[:2])
    assert not (tmp_path / "124M").exists()




@pytest.mark.parametrize("argv", [["sample.py", "--max-new-tokens", "1", "--model", "{model}"],
                                  ["explore.py", "--next", "Every", "--model", "{model}"],
                                  ["download_weights.py", "--export-gguf", "{model}", "{out}/m.gguf"],
                                  ["download_weights.py", "--export-hf", "{model}", "{out}/hf"]])
def test_a_hugging_face_folder_without_config_json_is_one_line_everywhere(argv, tmp_path, run_main):
    """model.safetensors alone: every script that loads it says which file is missing and where to get it,
    not [Errno 2]."""
    folder = tmp_path / "no-config"
    hf_twin(tiny_model()).save_pretrained(folder)
    (folder / "config.json").unlink()
    line = one_line_error(run_main(*[a.format(model=folder, out=tmp_path) for a in argv]))
    assert line == f"error: {folder / 'config.json'} not found: a Hugging Face folder needs the config.json " \
                   "that came with its model.safetensors (for GPT-2's own sizes: python download_weights.py " \
                   "--source huggingface)"
