"""train.py on the real the-verdict.txt with a tiny GPT: it learns, its data and losses match
an independent computation, resume is bitwise exact, and 2 processes match 1."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import tiktoken
import torch
from torch.nn import functional as F

from gpt2 import GPT
from train import load_tokens

TRAIN_SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
TRAIN_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--context-length", "32"]


def train_verdict(tmp_path):
    """A copy of the real the-verdict.txt in tmp_path (its token cache is written beside it)."""
    return shutil.copy(TRAIN_SHARED / "the-verdict.txt", tmp_path / "the-verdict.txt")


def train_cmd(data, out, *args, launcher=(sys.executable,)):
    return [*launcher, str(TRAIN_SCRIPT), "--data", str(data), "--out-dir", str(out), *TRAIN_TINY, *args]


def train_run(data, out, *args, launcher=(sys.executable,)):
    r = subprocess.run(train_cmd(data, out, *args, launcher=launcher), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_tiny_learns_and_reports_true_losses(tmp_path):
    data, out = train_verdict(tmp_path), tmp_path / "out"
    r = train_run(data, out, "--max-iters", "40", "--batch-size", "4", "--lr", "3e-3", "--eval-interval", "20",
                  "--dropout", "0")
    ckpt = train_load(out / "ckpt.pt")
    hist = ckpt["history"]
    assert ckpt["step"] == 40 and hist["step"] == [0, 20, 40] and len(hist["loss"]) == 40
    assert abs(hist["val"][0] - math.log(50257)) < 0.3  # untrained: about uniform over the vocabulary
    assert hist["val"][-1] < hist["val"][0] - 2.5
    assert "Every effort moves you" in r.stdout and "val loss" in r.stdout

    # The final validation loss, recomputed here from tiktoken's ids: last 10% of tokens, windows of 32, stride 32.
    ids = tiktoken.get_encoding("gpt2").encode(data.read_text(encoding="utf-8"))
    val = ids[int(0.9 * len(ids)):]
    windows = torch.tensor([val[i:i + 33] for i in range(0, len(val) - 32, 32)])
    model = GPT.from_pretrained(str(out / "ckpt.pt"))
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert len(windows) == 16 and abs(loss - hist["val"][-1]) < 1e-4

    best = train_load(out / "best.pt")  # the best validation loss so far is the last one here
    assert best["step"] == 40 and abs(best["val_loss"] - min(hist["val"])) < 1e-9
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    r = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--eval-only", "--init-from", str(out / "ckpt.pt"),
                        "--data", str(data), "--context-length", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    all_windows = torch.tensor([ids[i:i + 33] for i in range(0, len(ids) - 32, 32)])
    with torch.no_grad():
        logits, _ = model(all_windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), all_windows[:, 1:].flatten()).item()
    assert f"{len(all_windows)} windows of 32 tokens, loss {loss:.4f}" in r.stdout


def test_train_resume_after_ctrl_c_is_bitwise_exact(tmp_path):
    data = train_verdict(tmp_path)
    args = ["--max-iters", "60", "--batch-size", "2", "--eval-interval", "5", "--dropout", "0.1"]
    train_run(data, tmp_path / "straight", *args)

    out = tmp_path / "stopped"
    p = subprocess.Popen(train_cmd(data, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first checkpoint appears at step 5, in the middle of the run
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    stopped_at = train_load(out / "ckpt.pt")["step"]
    assert 5 <= stopped_at < 60 and "--resume continues" in stdout
    train_run(data, out, "--resume")

    a, b = train_load(tmp_path / "straight" / "ckpt.pt"), train_load(out / "ckpt.pt")
    assert a["step"] == b["step"] == 60
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    assert a["history"] == b["history"]


def test_train_two_processes_match_one(tmp_path):
    data = train_verdict(tmp_path)
    args = ["--max-iters", "4", "--batch-size", "4", "--eval-interval", "2", "--dropout", "0", "--lr", "1e-3"]
    train_run(data, tmp_path / "one", *args)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    r = train_run(data, tmp_path / "two", *args, launcher=torchrun)
    assert "2 process(es)" in r.stdout
    one, two = train_load(tmp_path / "one" / "ckpt.pt")["history"], train_load(tmp_path / "two" / "ckpt.pt")["history"]
    assert len(one["loss"]) == len(two["loss"]) == 4
    for key in ("loss", "train", "val"):
        assert max(abs(x - y) for x, y in zip(one[key], two[key])) < 1e-5, key
    assert one["loss"][-1] < one["loss"][0]  # it did train


def test_train_token_cache_follows_the_text(tmp_path):
    enc = tiktoken.get_encoding("gpt2")
    f = tmp_path / "a.txt"
    f.write_text("Hello world, once.", encoding="utf-8")
    assert load_tokens(str(f)).tolist() == enc.encode("Hello world, once.")
    cache = tmp_path / "a.txt.tokens.bin"
    assert cache.exists()
    f.write_text("Something else entirely.", encoding="utf-8")
    assert load_tokens(str(f)).tolist() == enc.encode("Something else entirely.")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "2.txt").write_text("second", encoding="utf-8")
    (folder / "1.txt").write_text("first", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_tokens(str(folder)).tolist() == enc.encode("first") + [50256] + enc.encode("second") + [50256]


def test_train_bad_data_is_one_clear_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Far too short to train on. " * 20, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    cases = {"missing.txt": "not found", "latin1.txt": "is not UTF-8", "short.txt": "too short", "empty": "no .txt files"}
    for name, message in cases.items():
        r = subprocess.run(train_cmd(tmp_path / name, tmp_path / "out"), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_default_data_offline_says_where_to_put_it(tmp_path):
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *TRAIN_TINY], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("error: could not download") and "data/the-verdict.txt" in last and "--data" in last
    assert not (tmp_path / "data" / "the-verdict.txt").exists()
