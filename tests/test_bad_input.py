"""Off the happy path, over every script: each bad input is one line (exit 1; 2 for a flag argparse rejects),
no traceback, and the files that were there before are byte-identical afterwards."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import devices
import files
import trainer
from errors import UserError
from tests.helpers import (INSTRUCT_TINY, OPENAI_124M, SAMPLE_PROMPT, SPAM_DATA, SPAM_TINY, TENSORFLOW, TINY,
                           free_port, hf_twin, one_line_error, run_in_process, run_script, snapshot,
                           tiny_model, train_args, train_load, train_verdict, write_openai_checkpoint)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step train.py run on the real the-verdict.txt: (data, out-dir, its arguments)."""
    tmp = tmp_path_factory.mktemp("trained")
    data, args = train_verdict(tmp), ("--max-iters", 8, "--eval-interval", 4, "--batch-size", 2)
    r = run_in_process("train.py", *train_args(data, tmp / "out", *args))
    assert r.returncode == 0, r.stderr[-3000:]
    return data, tmp / "out", args


def test_bad_rerun_of_train_never_replaces_a_trained_model(trained, run_main):
    data, out, args = trained
    before = snapshot(out)
    for extra in ((), ("--seed", 7), ("--max-iters", 3)):
        line = one_line_error(run_main("train.py", *train_args(data, out, *args, *extra)))
        assert "ckpt.pt is from an earlier run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_bad_resume_refuses_fixed_flags_and_records_the_changed_ones(trained, tmp_path, run_main):
    data, out, args = trained
    out = Path(shutil.copytree(out, tmp_path / "out"))
    before = snapshot(out)
    for flag, value in (("--n-layer", 3), ("--context-length", 64), ("--seed", 5),
                        ("--data", tmp_path / "x.txt")):
        line = one_line_error(run_main("train.py", "--out-dir", out, "--resume", flag, value))
        assert f"{flag} {value} differs from the checkpoint's" in line and "cannot change on --resume" in line
    assert snapshot(out) == before
    # best.pt holds a better model than the checkpoint knows of (written after ckpt.pt): it stays
    best = train_load(out / "best.pt")
    best["val_loss"] = 0.5
    torch.save(best, out / "best.pt")
    best_bytes = (out / "best.pt").read_bytes()
    run = run_main("train.py", "--out-dir", out, "--resume", "--max-iters", 12, "--lr", "1e-3",
                   "--dropout", 0)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = train_load(out / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["max_iters"] == 12
    assert ckpt["config"]["dropout"] == 0 and ckpt["args"]["n_layer"] == 2  # what the model really is
    assert ckpt["best_val"] == 0.5 and (out / "best.pt").read_bytes() == best_bytes


def test_bad_rerun_of_the_finetuning_scripts_keeps_their_output(tmp_path, run_main):
    spam_out, instruct_out = tmp_path / "spam", tmp_path / "instruct"
    spam_out.mkdir()
    instruct_out.mkdir()
    (spam_out / "classifier.pt").write_bytes(b"an earlier classifier")
    (instruct_out / "best.pt").write_bytes(b"an earlier model")
    before = snapshot(tmp_path)
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", SPAM_DATA,
                                   "--split-dir", tmp_path / "s", "--out-dir", spam_out))
    assert "classifier.pt is from an earlier run" in line and "--overwrite" in line
    line = one_line_error(run_main("finetune_instruct.py", *INSTRUCT_TINY, "--out-dir", instruct_out))
    assert "instruct/best.pt is from an earlier run" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script, args, message", [
    ("train", ["--max-iters", -3], "argument --max-iters: must be an integer >= 0, not -3"),
    ("train", ["--epochs", -1], "argument --epochs: must be an integer >= 1, not -1"),
    ("train", ["--batch-size", 0], "argument --batch-size: must be an integer >= 1, not 0"),
    ("train", ["--grad-accum", 0], "argument --grad-accum: must be an integer >= 1, not 0"),
    ("train", ["--context-length", 0], "argument --context-length: must be an integer >= 1, not 0"),
    ("train", ["--eval-interval", -1], "argument --eval-interval: must be an integer >= 0, not -1"),
    ("train", ["--lr", "nan"], "argument --lr: must be a number >= 0, not nan"),
    ("train", ["--dropout", 1.5], "argument --dropout: must be a number from 0 to 1, not 1.5"),
    ("train", ["--n-head", "three"], "argument --n-head: must be an integer >= 1, not three"),
    ("sample", ["--temperature", "nan"], "argument --temperature: must be a number >= 0, not nan"),
    ("sample", ["--temperature", "inf"], "argument --temperature: must be a number >= 0, not inf"),
    ("sample", ["--temperature", -1], "argument --temperature: must be a number >= 0, not -1"),
    ("sample", ["--top-k", -1], "argument --top-k: must be an integer >= 0, not -1"),
    ("sample", ["--top-p", 1.5], "argument --top-p: must be a number from 0 to 1, not 1.5"),
    ("sample", ["--num-samples", 0], "argument --num-samples: must be an integer >= 1, not 0"),
    ("finetune_spam", ["--epochs", 0], "argument --epochs: must be an integer >= 1, not 0"),
    ("finetune_spam", ["--batch-size", 0], "argument --batch-size: must be an integer >= 1, not 0"),
    ("finetune_instruct", ["--lora-rank", -1], "argument --lora-rank: must be an integer >= 0, not -1"),
    ("finetune_instruct", ["--max-iters", -5], "argument --max-iters: must be an integer >= 0, not -5"),
    ("finetune_instruct", ["--max-steps", 5], "--max-steps is now --max-iters"),
    ("finetune_instruct", ["--out", "out/x.pt"], "--out is now --out-dir"),
    ("finetune_instruct", ["--max-length", 128], "--max-length is now --context-length"),
    ("finetune_instruct", ["--evaluate", "r.json"], "--evaluate is now --judge"),
    ("finetune_spam", ["--max-steps", 5], "--max-steps is now --max-iters"),
    ("train", ["--out", "o"], "--out is now --out-dir"),
    ("train", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64' (choose from 'float32', "
                                      "'bfloat16', 'float16')"),
])
def test_bad_numbers_are_refused_before_any_work(script, args, message, run_main, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    r = run_main(f"{script}.py", *args)
    assert r.returncode == 2 and r.stderr == f"error: {message} (see {script}.py --help)\n"
    assert not list(tmp_path.iterdir())


def test_bad_sizes_and_devices_are_one_line(trained, tmp_path, run_main, monkeypatch):
    data, _, _ = trained
    monkeypatch.chdir(tmp_path)
    for script in ("train.py", "finetune_spam.py", "finetune_instruct.py"):
        line = one_line_error(run_main(script, "--init-from", "scratch", "--n-head", 3, "--n-embd", 64))
        assert line == "error: --n-embd 64 must be a multiple of --n-head 3 " \
                       "(the heads split the width)", script
    assert not list(tmp_path.iterdir())  # before any work: no download was tried, nothing written
    line = one_line_error(run_main("train.py", *train_args(data, tmp_path / "o", "--device", "cuda")))
    assert "--device cuda: this machine has no CUDA device" in line
    assert not (tmp_path / "o").exists()


def test_bad_out_dir_is_one_line_before_any_work(trained, tmp_path, monkeypatch, run_main):
    data, _, _ = trained
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line_error(run_main("train.py", *train_args(data, tmp_path / "a-file" / "out")))
    assert "cannot write to" in line and "a-file/out" in line
    # a read-only folder (root writes anywhere, so the refusal is simulated where the probe writes)
    real_open = open
    monkeypatch.setattr("builtins.open",
                        lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if ".write-test-" in str(path) else real_open(path, *a, **k))
    with pytest.raises(UserError, match="cannot write to .*read-only \\(Permission denied\\)"):
        files.check_out_files([str(tmp_path / "read-only" / "ckpt.pt")], overwrite=False)
    # a half-written checkpoint left by a kill -9 is cleared on the next start
    monkeypatch.undo()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt.4242.tmp").write_bytes(b"half")  # process 4242's, named by files.replaced
    files.check_out_files([str(tmp_path / "o" / "ckpt.pt")], overwrite=False)
    assert not (tmp_path / "o" / "ckpt.pt.4242.tmp").exists()


def test_bad_offline_tokenizer_says_what_is_needed(tmp_path):
    torch.save(tiny_model(vocab_size=50257).checkpoint(), tmp_path / "tiny.pt")
    sample_ckpt = None, tmp_path / "tiny.pt"
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
               "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}",
               "HTTP_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": ""}
    line = one_line_error(run_script("sample.py", "--model", sample_ckpt[1], cwd=tmp_path, env=offline,
                                     timeout=120))
    assert "GPT-2's tokenizer files could not be downloaded" in line and "TIKTOKEN_CACHE_DIR" in line
    # with a downloaded model's encoder.json in models/, the scripts use it offline
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "124M").symlink_to(OPENAI_124M)
    r = run_script("sample.py", "--model", sample_ckpt[1], "--max-new-tokens", 5, cwd=tmp_path, env=offline,
                   timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(SAMPLE_PROMPT), r.stderr[-2000:]


@TENSORFLOW
def test_bad_files_are_named(tmp_path, run_main):
    hf = hf_twin(tiny_model())
    folder = write_openai_checkpoint(tmp_path / "cut", hf, n_ctx=TINY["n_ctx"])
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])  # an interrupted copy
    # TensorFlow says nothing either
    line = one_line_error(run_script("sample.py", "--model", folder, timeout=120))
    assert f"{data} is cut short or damaged (Read less bytes than requested): download it" in line
    (folder / "hparams.json").write_text("{not json")
    line = one_line_error(run_main("sample.py", "--model", folder))
    assert f"{folder / 'hparams.json'} holds no GPT-2 config" in line
    junk = tmp_path / "classifier.pt"  # random bytes: not even a zip
    junk.write_bytes(os.urandom(3000))
    for r in (run_main("sample.py", "--model", junk),
              run_main("finetune_spam.py", "--out-dir", tmp_path, "--classify", "hi")):
        line = one_line_error(r)
        assert "is not a" in line and "of this project" in line and "weights_only" not in line
    (tmp_path / "latin1.tsv").write_bytes("ham\tcafé\n".encode("latin-1"))
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "café", "output": "x"}]'.encode("latin-1"))
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", tmp_path / "latin1.tsv",
                                   "--out-dir", tmp_path / "s"))
    assert f"{tmp_path / 'latin1.tsv'} is not UTF-8 text" in line
    line = one_line_error(run_main("finetune_instruct.py", *INSTRUCT_TINY, "--data", tmp_path / "latin1.json",
                                   "--out-dir", tmp_path / "i"))
    assert f"{tmp_path / 'latin1.json'} is not a UTF-8 JSON file" in line


def test_bad_flags_are_found_before_the_first_write(tmp_path, run_main):
    """Every check of the flags and the model comes before any file is written or replaced: the split files,
    the token cache, the data download, the out-dir."""
    split = tmp_path / "split"
    split.mkdir()
    for name in ("train", "validation", "test"):
        (split / f"{name}-seed123.tsv").write_text(f"ham\tan earlier {name} split\n", encoding="utf-8")
    torch.save(tiny_model(vocab_size=50257).checkpoint(), tmp_path / "tiny.pt")  # n_ctx 64
    data = train_verdict(tmp_path)
    before = snapshot(tmp_path)
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--n-layer", 1, "--trainable-blocks", 7,
                                   "--data", SPAM_DATA, "--split-dir", split, "--out-dir", tmp_path / "s"))
    assert "--trainable-blocks 7: give 'all' or a number from 0 to 1" in line
    line = one_line_error(run_main("train.py", "--init-from", tmp_path / "tiny.pt", "--context-length", 128,
                                   "--data", data, "--out-dir", tmp_path / "t"))
    assert "--context-length 128 is longer than" in line \
           and "window of 64 positions: pass --context-length 64 or less" in line
    line = one_line_error(run_main("finetune_instruct.py", "--init-from", tmp_path / "tiny.pt",
                                   "--context-length", 128, "--data", tmp_path / "missing.json",
                                   "--out-dir", tmp_path / "i"))
    assert "--context-length 128 is longer than" in line \
           and "window of 64 positions: pass --context-length 64 or less" in line
    assert snapshot(tmp_path) == before \
           and sorted(os.listdir(tmp_path)) == ["split", "the-verdict.txt", "tiny.pt"]


def test_bad_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, run_main, monkeypatch):
    torch.save(tiny_model(vocab_size=50257).checkpoint(), tmp_path / "tiny.pt")
    free = devices.free_memory("cpu")
    assert 2**28 < free < 2**50  # this machine's MemAvailable, read
    for n in (1_000_000, 100_000_000):  # 0.8 MB a sample: far more than any machine here holds
        line = one_line_error(run_main("sample.py", "--model", tmp_path / "tiny.pt", "--num-samples", n))
        assert f"{n:,} samples need about" in line \
               and "GiB free on cpu: lower --num-samples or --max-new-tokens" in line
    line = one_line_error(run_main("train.py", "--n-layer", 100_000, "--n-embd", 4608,
                                   "--out-dir", tmp_path / "t"))
    assert "the new model's weights need about 94,9" in line \
           and "lower --n-layer, --n-embd or --context-length" in line
    # a training step too big for what is free: refused before the split files are replaced
    split = tmp_path / "split"
    split.mkdir()
    (split / "train-seed123.tsv").write_text("ham\tan earlier split\n", encoding="utf-8")
    before = snapshot(tmp_path)
    # the model fits (13 MB), its steps not (22 MB)
    monkeypatch.setattr(devices, "free_memory", lambda device: 2**24)
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--batch-size", 32, "--data", SPAM_DATA,
                                   "--split-dir", split, "--out-dir", tmp_path / "s"))
    assert "training steps of" in line and "more than the 0.0 GiB free on cpu: lower --batch-size" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()


def test_the_training_memory_bound_is_below_what_a_step_takes(monkeypatch):
    """check_training_memory refuses only what cannot fit: its bound is below what torch really allocates
    for a step (counted by torch's profiler of the CPU allocator), so no run that fits is refused."""
    model = tiny_model(vocab_size=50257, n_ctx=64).train()
    optimizer = trainer.configure_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, 50257, (4, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        loss = model(x, x)[1]
        loss.backward()
        optimizer.step()
    peak, held = 0, 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += e.cpu_memory_usage
        peak = max(peak, held)
    trainable = sum(p.numel() for p in model.parameters())
    bound = 12 * trainable + x.numel() * (8 * 50257 + 16 * 2 * 32 * 4)
    seen = []
    monkeypatch.setattr(devices, "check_memory", lambda need, *a: seen.append(need))
    devices.check_training_memory(model, x.numel(), "float32", "cpu")
    assert seen == [bound] and bound < peak
