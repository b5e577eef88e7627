"""train.py: tiny runs on the real the-verdict.txt."""

import math
import os
import signal
import subprocess
import sys
import time

import tiktoken
import torch
from torch.nn import functional as F

from corpus import load_tokens
from gpt2 import GPT, Tokenizer
from tests.helpers import (ROOT, TRAIN_TINY, assert_bitwise_equal, free_port, one_line_error,
                           stop_then_resume, train_args, train_load, train_run, train_verdict)


def test_train_tiny_learns_and_reports_true_losses(tmp_path, run_main):
    data, out = train_verdict(tmp_path), tmp_path / "out"
    r = run_main("train.py", *train_args(data, out, "--max-iters", 40, "--batch-size", 4, "--lr", "3e-3",
                                         "--eval-interval", 20, "--dropout", 0))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = train_load(out / "ckpt.pt")
    hist = ckpt["history"]
    assert ckpt["step"] == 40 and hist["step"] == [0, 20, 40] and len(hist["loss"]) == 40
    assert abs(hist["val"][0] - math.log(50257)) < 0.3  # untrained: about uniform over the vocabulary
    assert hist["val"][-1] < hist["val"][0] - 2.5
    assert "Every effort moves you" in r.stdout and "val loss" in r.stdout

    # The final validation loss, recomputed here from tiktoken's ids: last 10% of tokens, windows
    # of 32, stride 32.
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

    r = run_main("train.py", "--eval-only", "--init-from", out / "ckpt.pt", "--data", data,
                 "--context-length", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    all_windows = torch.tensor([ids[i:i + 33] for i in range(0, len(ids) - 32, 32)])
    with torch.no_grad():
        logits, _ = model(all_windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), all_windows[:, 1:].flatten()).item()
    assert f"{len(all_windows)} windows of 32 tokens, loss {loss:.4f}" in r.stdout


def test_train_resume_after_ctrl_c_is_bitwise_exact(tmp_path, run_main):
    data = train_verdict(tmp_path)
    args = ["--data", data, *TRAIN_TINY, "--max-iters", "30", "--batch-size", "2", "--eval-interval", "5",
            "--dropout", "0.1"]
    a, b, stopped_at, stdout = stop_then_resume("train.py", args, tmp_path / "straight", tmp_path / "stopped",
                                                run_main)
    assert 1 <= stopped_at < 30 \
           and f"python train.py --resume --out-dir {tmp_path / 'stopped'} continues" in stdout
    assert a["step"] == 30
    assert_bitwise_equal(a, b)


def test_train_two_processes_match_one_stop_on_ctrl_c_once_and_resume_under_torchrun(tmp_path, run_main):
    """python train.py --nproc-per-node 2, and a Ctrl-C at the terminal (SIGINT to its process group): each
    process is told once, by the launcher, so they save and it exits 130 without a traceback (torchrun's own
    launcher prints its SignalException's). torchrun then resumes the run (the two launchers give the same
    variables), and its 12 steps are one process's, loss for loss."""
    data = train_verdict(tmp_path)
    run = ["--max-iters", 12, "--batch-size", 4, "--eval-interval", 4, "--dropout", 0, "--lr", 1e-3]
    args = train_args(data, tmp_path / "two", *run, "--nproc-per-node", 2)
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (tmp_path / "two" / "best.pt").exists() and p.poll() is None:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)  # what a Ctrl-C at the terminal does
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.count("stopping: saving after this step") == 1 and "2 process(es)" in out
    stopped_at = train_load(tmp_path / "two" / "ckpt.pt")["step"]
    assert 1 <= stopped_at < 12
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}")
    r = train_run(data, tmp_path / "two", *run, "--resume", launcher=torchrun)
    assert f"2 process(es), float32, from step {stopped_at}" in r.stdout
    assert run_main("train.py", *train_args(data, tmp_path / "one", *run)).returncode == 0
    one, two = (train_load(tmp_path / run / "ckpt.pt")["history"] for run in ("one", "two"))
    assert len(one["loss"]) == len(two["loss"]) == 12
    for key in ("loss", "train", "val"):
        assert max(abs(x - y) for x, y in zip(one[key], two[key])) < 1e-5, key
    assert one["loss"][-1] < one["loss"][0]  # it did train


def test_train_from_many_shards_gives_the_losses_of_one(tmp_path, monkeypatch, run_main):
    import corpus

    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 700)  # 8 shards: many windows of 33 tokens span two
    tokens = load_tokens(train_verdict(many), Tokenizer())
    assert len(tokens.shards) == 8
    args = ["--max-iters", "4", "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2",
            "--dropout", "0.1"]
    monkeypatch.undo()  # the runs: one shard of one/, and the 8 of many/ that are there already
    for out, data in ((one / "out", train_verdict(one)), (many / "out", many / "the-verdict.txt")):
        assert run_main("train.py", *train_args(data, out, *args)).returncode == 0
    a, b = train_load(one / "out" / "ckpt.pt"), train_load(many / "out" / "ckpt.pt")
    assert len(b["history"]["loss"]) == 4 and b["history"]["step"] == [0, 4]
    assert a["history"] == b["history"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_train_bad_data_is_one_clear_line(tmp_path, run_main):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Far too short to train on. " * 20, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    cases = {"missing.txt": "not found", "latin1.txt": "is not UTF-8", "short.txt": "too short",
             "empty": "no .txt files"}
    for name, message in cases.items():
        r = run_main("train.py", *train_args(tmp_path / name, tmp_path / "out"))
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_default_data_offline_says_where_to_put_it(tmp_path, run_main):
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = run_main("train.py", *TRAIN_TINY, cwd=tmp_path, env=env)
    *retries, last = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("error: could not download") and "data/the-verdict.txt" in last \
           and "--data" in last
    # "not found: downloading", 2 short retries
    assert len(retries) == 3 and all(len(line) < 60 for line in retries[1:])
    assert not (tmp_path / "data" / "the-verdict.txt").exists()




def test_the_books_run_starts_from_the_books_weights_and_every_other_from_gpt2s(tmp_path, monkeypatch,
                                                                                  run_main):
    """The default data from scratch gets the book's GPTModel's first weights: PyTorch's defaults (token
    vectors of std 1, linear layers within nn.Linear's bound) and a head of its own; another --data keeps
    GPT-2's (std 0.02, the head tied to wte). The checkpoint says which, and loads back as trained."""
    monkeypatch.chdir(tmp_path)
    for folder in ("data", "other"):
        (tmp_path / folder).mkdir()
        train_verdict(tmp_path / folder)
    for out, extra in (("book", []), ("gpt2", ["--data", "other/the-verdict.txt"])):
        r = run_main("train.py", *TRAIN_TINY, "--out-dir", out, "--max-iters", 1, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    book, gpt2 = (train_load(tmp_path / out / "ckpt.pt") for out in ("book", "gpt2"))
    assert book["args"]["init"] == "book" and not book["config"]["tied_head"]
    assert gpt2["args"]["init"] == "gpt2" and gpt2["config"]["tied_head"]
    wte, head = book["model"]["transformer.wte.weight"], book["model"]["lm_head.weight"]
    assert abs(wte.std().item() - 1) < 0.01 and not torch.equal(wte, head)
    bound = 1 / math.sqrt(32)  # nn.Linear's kaiming-uniform bound for 32 inputs
    assert 0.9 * bound < head.abs().max() <= bound + 1e-3  # (one step of lr 4e-4 moved it)
    assert abs(gpt2["model"]["transformer.wte.weight"].std().item() - 0.02) < 0.001
    assert torch.equal(gpt2["model"]["transformer.wte.weight"], gpt2["model"]["lm_head.weight"])
    model = GPT.from_pretrained(str(tmp_path / "book" / "ckpt.pt"))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, head)
    line = one_line_error(run_main("train.py", "--init", "book", "--init-from",
                                   tmp_path / "gpt2" / "ckpt.pt", "--out-dir", "c"))
    assert "--init book sets a new model's weights: it goes with --init-from scratch" in line
