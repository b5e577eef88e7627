"""trainer.py through the three training scripts: --resume to more steps is the longer run bit for bit and to
fewer is one line, a diverging loss stops the run, one run per out-dir, a log without progress bars, and
rotary positions wherever a model goes."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import gpt2
from gpt2 import GPT, GPTConfig
from trainer import build_model
from tests.helpers import (INSTRUCT_TINY, ROOT, SAMPLE_PROMPT, SPAM_TINY, TRAIN_TINY, assert_bitwise_equal,
                           one_line_error, snapshot, spam_sample, train_load, train_verdict)


def script_args(script, tmp_path):
    """A tiny run of script on the real data, the flags that make it, less --out-dir and the steps."""
    if script == "train.py":
        return ["--data", train_verdict(tmp_path), *TRAIN_TINY, "--batch-size", 2, "--eval-interval", 2,
                "--dropout", 0.1]
    if script == "finetune_spam.py":
        spam_sample(tmp_path)
        return ["--data", tmp_path / "sample.tsv", "--split-dir", tmp_path / "split", *SPAM_TINY,
                "--eval-interval", 2, "--eval-batches", 1, "--dropout", 0.1, "--lr", 1e-3]
    return [*INSTRUCT_TINY, "--eval-interval", 2, "--dropout", 0.1, "--context-length", 128]


@pytest.mark.parametrize("amd", [False, True])
def test_a_resumed_model_trains_in_nn_linears_layout_on_each_cpu(tmp_path, monkeypatch, amd):
    """Whichever layout load_weights picks for generation on this CPU, the model build_model resumes
    has every weight contiguous (out, in), as a new one has: the run it resumes computed with those."""
    monkeypatch.setattr(gpt2, "AMD_CPU", amd)
    saved = GPT(GPTConfig(vocab_size=100, n_ctx=32, n_embd=64, n_head=4, n_layer=2))
    args = SimpleNamespace(seed=0, out_dir=str(tmp_path), dropout=None)
    model = build_model(args, saved.checkpoint())
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), saved.state_dict().values()))


@pytest.mark.parametrize("script", ["train.py", "finetune_spam.py", "finetune_instruct.py"])
def test_resume_to_more_steps_is_the_longer_run_and_to_fewer_is_one_line(script, tmp_path, run_main):
    """N steps, then --resume --max-iters 2N: bitwise the weights, AdamW state and history of a 2N-step run
    (the learning rate is constant); then --resume --max-iters N on it: one line, exit 1, files kept."""
    args = script_args(script, tmp_path)
    for out, steps in (("straight", 8), ("first", 4)):
        r = run_main(script, *args, "--out-dir", tmp_path / out, "--max-iters", steps)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_main(script, *args, "--out-dir", tmp_path / "first", "--max-iters", 8, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (train_load(tmp_path / out / "ckpt.pt") for out in ("straight", "first"))
    assert a["step"] == b["step"] == 8
    assert_bitwise_equal(a, b)
    before = snapshot(tmp_path / "first")
    line = one_line_error(run_main(script, *args, "--out-dir", tmp_path / "first", "--max-iters", 4,
                                   "--resume"))
    assert "ckpt.pt is at step 8 already, and this run ends at step 4: pass a larger --max-iters" in line
    assert snapshot(tmp_path / "first") == before


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_files(tmp_path, run_main):
    data, out = train_verdict(tmp_path), tmp_path / "out"
    line = one_line_error(run_main("train.py", "--data", data, *TRAIN_TINY, "--out-dir", out, "--lr", 1e9,
                                   "--max-iters", 20, "--eval-interval", 1))
    assert "training diverged" in line and "lower --lr (now 1e+09)" in line and " at step " in line
    best = train_load(out / "best.pt")  # from an evaluation before the loss became nan
    assert torch.isfinite(torch.tensor(best["val_loss"]))
    assert all(torch.isfinite(t).all() for t in best["model"].values())
    assert not (out / "ckpt.pt").exists()  # never saved with nan weights


def test_a_second_run_into_the_same_out_dir_is_refused_while_the_first_runs(tmp_path, run_main):
    """Two train.py runs into one --out-dir at once: the second says which process holds it and touches
    nothing; the first ends as if alone."""
    data, out = train_verdict(tmp_path), tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", data, *TRAIN_TINY,
                              "--out-dir", out, "--max-iters", "40", "--eval-interval", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".lock.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    line = one_line_error(run_main("train.py", "--data", data, *TRAIN_TINY, "--out-dir", out,
                                   "--max-iters", 2, "--overwrite"))
    assert f"is in use by a run that has not ended (process {first.pid})" in line
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert train_load(out / "ckpt.pt")["step"] == 40


def test_a_log_has_one_line_per_evaluation_and_no_progress_bars(tmp_path, run_main):
    r = run_main("train.py", "--data", train_verdict(tmp_path), *TRAIN_TINY, "--out-dir", tmp_path / "o",
                   "--max-iters", 6, "--eval-interval", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr + r.stdout and "%|" not in r.stderr + r.stdout
    assert [line.split(" (")[0] for line in r.stdout.splitlines() if line.startswith("step ")] == \
           ["step 0", "step 2", "step 4", "step 6"]


def test_rotary_positions_train_resume_and_sample(tmp_path, run_main):
    """--positions rope: the checkpoint keeps it and has no wpe; --resume and sample.py read it so."""
    data, out = train_verdict(tmp_path), tmp_path / "o"
    args = ["--data", data, *TRAIN_TINY, "--out-dir", out, "--positions", "rope", "--eval-interval", 2]
    r = run_main("train.py", *args, "--max-iters", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_main("train.py", *args, "--max-iters", 4, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = train_load(out / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["positions"] == "rope"
    assert not any("wpe" in k for k in ckpt["model"])
    model = GPT.from_pretrained(str(out / "best.pt"))
    assert model.config.positions == "rope"
    r = run_main("sample.py", "--model", out / "best.pt", "--max-new-tokens", 5, "--temperature", 0)
    assert r.returncode == 0 and r.stdout.startswith(SAMPLE_PROMPT), r.stderr[-2000:]
    line = one_line_error(run_main("train.py", *args, "--max-iters", 6, "--resume", "--positions",
                                     "learned"))
    assert "--positions learned differs from the checkpoint's rope" in line
    line = one_line_error(run_main("download_weights.py", "--export-hf", out / "best.pt", tmp_path / "hf"))
    assert "has rotary positions, which GPT-2's Hugging Face format cannot hold" in line
    assert not (tmp_path / "hf").exists()
