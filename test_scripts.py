"""Tests of download_weights.py (against a local HTTP server) and sample.py (on a tiny checkpoint)."""

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import common
import download_weights
from common import UserError, download, save_atomic
from gpt2 import GPT, GPTConfig, Tokenizer

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"
ENV = {**os.environ, "TIKTOKEN_CACHE_DIR": str(DATA / "tiktoken-cache"), "PYTHONIOENCODING": "utf-8"}


def _script(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)


# -----------------------------------------------------------------------------
# download_weights.py and common.download, against a server on 127.0.0.1


class _DlHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}, honouring "Range: bytes=N-" unless server.ignore_range.
    A path in server.cut_once is sent only half through, once: the connection drops mid-file."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
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
        self.end_headers()
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def dl_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DlHandler)
    srv.files, srv.requests, srv.cut_once, srv.ignore_range = {}, [], set(), False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def dl_no_wait(monkeypatch):
    monkeypatch.setattr(common, "RETRY_WAIT", 0.0)


def _dl_release(size):
    """The files of a release as the server holds them: the real tokenizer files, and for 124M
    the real small checkpoint files; anything else is made-up bytes."""
    real = {name: (DATA / "gpt2-124M" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    if size == "124M":
        real |= {name: (DATA / "gpt2-124M" / name).read_bytes()
                 for name in ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.meta")}
    fake = {name: os.urandom(1000 + 37 * i) for i, name in enumerate(download_weights.FILES)}
    return {f"/{size}/{name}": real.get(name, fake[name]) for name in download_weights.FILES}


def test_dl_sizes_table_names_every_file():
    for sizes in download_weights.PUBLISHED.values():
        assert set(sizes) <= set(download_weights.FILES)
    assert set(download_weights.PUBLISHED) == {"124M", "355M", "774M", "1558M"}
    # the real 124M files in shared/data have the sizes the table gives
    for name, n in {**download_weights.SAME_FOR_ALL, **download_weights.PUBLISHED["124M"]}.items():
        if (DATA / "gpt2-124M" / name).exists():
            assert (DATA / "gpt2-124M" / name).stat().st_size == n, name


def test_dl_interrupted_transfer_resumes_with_range(dl_server, dl_no_wait, tmp_path, monkeypatch, capsys):
    """124M with the real small files (only the data file's published size is shrunk to a fake
    one): model.ckpt.meta drops half way, the retry asks for the rest and the file comes out whole."""
    dl_server.files = _dl_release("124M")
    data = "model.ckpt.data-00000-of-00001"
    monkeypatch.setitem(download_weights.PUBLISHED, "124M",
                        {**download_weights.PUBLISHED["124M"], data: len(dl_server.files[f"/124M/{data}"])})
    dl_server.cut_once = {"/124M/model.ckpt.meta"}
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


def test_dl_cut_then_next_run_resumes(dl_server, dl_no_wait, tmp_path):
    """A run that gives up leaves its .part; the next run fetches only the missing bytes."""
    body = os.urandom(300_000)
    dl_server.files = {"/f": body}
    dl_server.cut_once = {"/f"}
    dest = str(tmp_path / "f")
    with pytest.raises(UserError, match="run again"):
        download(dl_server.url + "/f", dest, size=len(body), retries=1)
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept <= len(body) // 2 and not os.path.exists(dest)
    download(dl_server.url + "/f", dest, size=len(body), retries=1)
    assert Path(dest).read_bytes() == body and not os.path.exists(dest + ".part")
    assert dl_server.requests[-1] == ("/f", f"bytes={kept}-")


def test_dl_server_ignoring_range_starts_over(dl_server, dl_no_wait, tmp_path):
    body = os.urandom(300_000)
    dl_server.files, dl_server.cut_once, dl_server.ignore_range = {"/f": body}, {"/f"}, True
    dest = str(tmp_path / "f")
    download(dl_server.url + "/f", dest)  # no size given: the server's Content-Length is checked
    assert Path(dest).read_bytes() == body
    assert len(dl_server.requests) == 2 and dl_server.requests[1][1].startswith("bytes=")  # asked, got 200


def test_dl_unknown_size_checked_against_content_length(dl_server, dl_no_wait, tmp_path):
    body = os.urandom(300_000)
    dl_server.files = {"/f": body}
    dl_server.cut_once = {"/f"}
    dest = str(tmp_path / "f")
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
    assert common.ensure_file(str(path), dl_server.url + "/f") == str(path) and path.read_bytes() == b"hello"
    n = len(dl_server.requests)
    common.ensure_file(str(path), dl_server.url + "/f")  # there already: no request
    assert len(dl_server.requests) == n
    with pytest.raises(UserError, match=f"put the file at {tmp_path / 'g'} yourself"):
        common.ensure_file(str(tmp_path / "g"), dl_server.url + "/missing")  # 404
    assert not list(tmp_path.glob("g*"))


def test_dl_script_downloads_then_skips(dl_server, tmp_path):
    """774M: the tokenizer files are checked against their published sizes, the rest against
    Content-Length; a second run requests nothing."""
    dl_server.files = _dl_release("774M")
    args = ["--model", "gpt2-large", "--models-dir", tmp_path, "--base-url", dl_server.url]
    r = _script("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    for path, body in dl_server.files.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body, path
    n = len(dl_server.requests)
    r = _script("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("complete, skipped") == 7 and len(dl_server.requests) == n


def test_dl_script_refuses_wrong_size(dl_server, tmp_path):
    dl_server.files = _dl_release("774M")
    dl_server.files["/774M/vocab.bpe"] = dl_server.files["/774M/vocab.bpe"][:-10]  # truncated on the server
    r = _script("download_weights.py", "--model", "774M", "--models-dir", tmp_path, "--base-url", dl_server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # above it: the progress bars of the files before
    assert last.startswith("error: ") and "published size is 456,318" in last
    folder = tmp_path / "774M"
    assert not (folder / "vocab.bpe").exists() and not (folder / "vocab.bpe.part").exists()
    assert (folder / "encoder.json").exists()  # the files before it were fine


def test_dl_script_unreachable_server(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _script("download_weights.py", "--models-dir", tmp_path, "--base-url", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download") and "check your connection" in last
    assert not list(tmp_path.rglob("checkpoint*"))


def test_dl_script_unknown_model(tmp_path):
    r = _script("download_weights.py", "--model", "gpt3", "--models-dir", tmp_path)
    assert r.returncode == 1 and "unknown model size 'gpt3'" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# sample.py, on a tiny train.py-style checkpoint

SAMPLE_PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_ctx=64, n_embd=64, n_head=4, n_layer=2)).eval()
    path = str(tmp_path_factory.mktemp("sample") / "tiny.pt")
    save_atomic(model.checkpoint(step=0), path)
    return model, path


def _sample(path, *args, cwd=ROOT):
    return _script("sample.py", "--model", path, "--device", "cpu", *args, cwd=cwd)


def test_sample_same_seed_same_text(sample_ckpt):
    _, path = sample_ckpt
    runs = [_sample(path, "--seed", seed, "--num-samples", 2, "--max-new-tokens", 12) for seed in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    first, second = runs[0].stdout.split("\n" + "-" * 40 + "\n")
    assert first.startswith(SAMPLE_PROMPT) and second.startswith(SAMPLE_PROMPT) and first != second


def test_sample_greedy_equals_generate(sample_ckpt):
    """--temperature 0 prints the prompt and then exactly what model.generate decodes to, here
    past the 64-token window."""
    model, path = sample_ckpt
    prompt = SAMPLE_PROMPT + " to the end of the road, and further"
    r = _sample(path, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 60)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), 60, temperature=0)
    assert r.stdout == prompt + tok.decode(out[0, len(ids):].tolist()) + "\n"


def test_sample_prints_characters_split_over_tokens_whole(capsys):
    from sample import print_as_generated

    tok = Tokenizer()
    text = "naïve 🙂 café 你好 👍🏽"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))  # some tokens end mid-character
    print_as_generated(iter(ids), tok)
    assert capsys.readouterr().out == text + "\n"  # a U+FFFD once printed would stay in the output


def test_sample_instruction_uses_the_alpaca_prompt(sample_ckpt):
    """--instruction: the prompt is format_prompt(entry) and only the response is printed."""
    from finetune_instruct import format_prompt

    model, path = sample_ckpt
    entry = {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal."}
    r = _sample(path, "--instruction", entry["instruction"], "--input", entry["input"],
                "--temperature", 0, "--max-new-tokens", 10)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = tok.encode(format_prompt(entry))
    out = model.generate(torch.tensor([ids]), 10, temperature=0, eos_id=tok.eot_id)
    assert tok.eot_id not in out[0, len(ids):]  # (this random model never ends: see the next test)
    assert r.stdout == tok.decode(out[0, len(ids):].tolist()) + "\n"


def test_sample_instruction_stops_at_end_of_text(sample_ckpt, tmp_path):
    """A model rigged to answer " Yes" and then <|endoftext|>: sample.py prints " Yes" alone."""
    tok = Tokenizer()
    yes, eot = tok.encode(" Yes")[0], tok.eot_id
    model = GPT(sample_ckpt[0].config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Zero blocks leave each position's vector as its token's embedding: zero for all but
        # " Yes" (e0) and <|endoftext|> (e1). After any other token ln_f gives its bias e0, so
        # " Yes" scores highest; after " Yes" the weights below turn e0 into mostly +e1: end.
        model.transformer.wte.weight[yes, 0] = model.transformer.wte.weight[eot, 1] = 1.0
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.ln_f.weight[0], model.transformer.ln_f.weight[1] = -1.0, -100.0
    path = str(tmp_path / "yes.pt")
    save_atomic(model.checkpoint(), path)
    assert tok.decode(model.generate(torch.tensor([[0]]), 4, temperature=0)[0, 1:].tolist()) == " Yes<|endoftext|>" * 2
    r = _sample(path, "--instruction", "Is the sky blue?", "--temperature", 0, "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == " Yes\n"


def test_sample_tokenizer_of_an_openai_folder(sample_ckpt, tmp_path, monkeypatch):
    """A size name or folder reads the folder's encoder.json (offline); a .pt uses tiktoken's."""
    import tiktoken
    from sample import tokenizer_for

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "124M").symlink_to(DATA / "gpt2-124M")
    monkeypatch.chdir(tmp_path)
    text = "Every effort moves you, naïvely 🙂"
    for spec in ("gpt2", str(DATA / "gpt2-124M")):
        tok = tokenizer_for(spec)
        assert tok.enc is not tiktoken.get_encoding("gpt2") and tok.encode(text) == Tokenizer().encode(text)
    assert tokenizer_for(sample_ckpt[1]).enc is tiktoken.get_encoding("gpt2")


def test_sample_prompt_longer_than_context(sample_ckpt):
    _, path = sample_ckpt
    prompt = "word " * 100
    r = _sample(path, "--prompt", prompt)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    n = len(Tokenizer().encode(prompt))
    assert f"the prompt is {n} tokens, longer than the model's context window (64)" in r.stderr


def test_sample_missing_model_names_the_download_command(tmp_path):
    r = _script("sample.py", "--model", "gpt2", cwd=tmp_path)  # no models/ here
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python download_weights.py --model 124M" in r.stderr


def test_sample_bad_option(sample_ckpt):
    r = _sample(sample_ckpt[1], "--top-p", 1.5)
    assert r.returncode == 1 and "error: --top-p must be in (0, 1]" in r.stderr


def test_scripts_help():
    for script in ("sample.py", "download_weights.py"):
        r = _script(script, "--help")
        assert r.returncode == 0 and "(default: " in r.stdout, script
