"""What the scripts' tests share: running a script as a user would (run_script) or its main() in this
process (run_main), a local HTTP server (serve), tiny models (from test_gpt2.py, the model's own tests),
and the checks of bad input: one line, no traceback, the files that were there left as they were."""

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from test_gpt2 import TINY, hf_twin, tiny_model, write_openai_checkpoint  # noqa: F401  (for the tests here)

ROOT = Path(__file__).resolve().parent.parent  # the project
DATA = Path(os.environ["GPT2_DATA"])  # the real data (see the project's conftest.py)
OPENAI_124M = DATA / "gpt2-124M"
EOT = 50256  # <|endoftext|>, as tiktoken numbers it


def run_script(name, *args, cwd=ROOT, env=None, timeout=300, launcher=(sys.executable,)):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(script, *args): the script's main() in this process, as `python script args` runs it
    but without starting a new interpreter -> a CompletedProcess, as run_script gives."""
    import errors

    def run(script, *args):
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        handler = signal.getsignal(signal.SIGTERM)
        try:
            errors.run(module.main)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            signal.signal(signal.SIGTERM, handler)  # (errors.run makes SIGTERM a Ctrl-C)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)
    return run


def free_port():
    """A port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reply(handler, body, status=200, content_type="application/octet-stream"):
    """Answer the request an HTTP handler holds with body (bytes) and status."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve():
    """serve(handler, **attributes) starts an HTTP server on 127.0.0.1 with those attributes and
    .url; every server started is shut down after the test."""
    servers = []

    def start(handler, **attributes):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.__dict__.update(attributes)
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# Off the happy path: every bad input is one line (exit 1; 2 for a flag argparse rejects), no
# traceback, and the files that were there before are byte-identical afterwards.


def one_line_error(r, code=1):
    """The single 'error: ...' line of a run that must have failed cleanly."""
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-3000:]
    # less progress bars
    lines = [line for line in r.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def stop_then_resume(script, args, straight, stopped, cwd=ROOT):
    """Run `script args` into the out-dir straight, then again into stopped, Ctrl-C'd once its first best
    model is saved (at the evaluation of step 0, or of the first step --eval-interval gives) and resumed
    with --resume
    -> (the two final ckpt.pt, the step it stopped at, its stdout)."""
    run = [sys.executable, str(ROOT / script), *map(str, args)]
    r = subprocess.run([*run, "--out-dir", straight], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen([*run, "--out-dir", stopped], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((Path(cwd) / stopped).glob("*.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    stopped_at = torch.load(Path(cwd) / stopped / "ckpt.pt", weights_only=True)["step"]
    r = subprocess.run([*run, "--out-dir", stopped, "--resume"], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(Path(cwd) / folder / "ckpt.pt", weights_only=True) for folder in (straight, stopped))
    return a, b, stopped_at, stdout


def assert_bitwise_equal(a, b):
    """Two ckpt.pt: the same step, weights, optimizer state and history, bit for bit."""
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    assert a["history"] == b["history"]


# -----------------------------------------------------------------------------
# Tiny runs of each script on the real data.

TRAIN_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--context-length", "32"]


def train_verdict(tmp_path):
    """A copy of the real the-verdict.txt in tmp_path (its token cache is written beside it)."""
    return shutil.copy(DATA / "the-verdict.txt", tmp_path / "the-verdict.txt")


def train_args(data, out, *args):
    return ["--data", data, "--out-dir", out, *TRAIN_TINY, *args]


def train_run(data, out, *args, launcher=(sys.executable,)):
    r = run_script("train.py", *train_args(data, out, *args), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


SPAM_DATA = DATA / "sms-spam" / "SMSSpamCollection"
SPAM_TINY = ["--init-from", "scratch", "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
             "--context-length", "300"]


def spam_sample(folder):
    """folder/sample.tsv: the real file's first 60 ham and first 60 spam lines."""
    lines = SPAM_DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    sample = ([l for l in lines if l.startswith("ham\t")][:60]
              + [l for l in lines if l.startswith("spam\t")][:60])
    (folder / "sample.tsv").write_text("".join(sample), encoding="utf-8")


INSTRUCT_DATA = DATA / "instruction-data.json"
INSTRUCT_TINY = ("--init-from", "scratch", "--n-layer", 2, "--n-head", 4, "--n-embd", 64,
                 "--data", INSTRUCT_DATA, "--batch-size", 4, "--eval-batches", 1, "--max-new-tokens", 3,
                 "--lr", 1e-3)
SAMPLE_PROMPT = "Every effort moves you"
