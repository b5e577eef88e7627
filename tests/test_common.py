"""What the scripts share: flags, devices and precision, plots, the optimizer, batches and one-line errors."""

import platform
import re

import pytest
import torch

import devices
import errors
import plots
import trainer
from gpt2 import Tokenizer
from loading import openai_tokenizer
from tests.helpers import DATA, OPENAI_124M, tiny_model, train_args, train_load, train_verdict


def test_tokenizer_from_openai_files_equals_tiktoken():
    """The encoding built from encoder.json equals tiktoken's: every token's bytes (the whole rank
    table), the special token, the pre-tokenizer pattern, and the ids of real text."""
    ours, reference = openai_tokenizer(OPENAI_124M), Tokenizer()
    for i in range(reference.enc.n_vocab - 1):
        assert ours.enc.decode_single_token_bytes(i) == reference.enc.decode_single_token_bytes(i), i
    assert ours.enc._special_tokens == reference.enc._special_tokens \
           and ours.enc._pat_str == reference.enc._pat_str
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8") + " 日本語 🎉 <|endoftext|> naïve\r\n"
    assert ours.encode(text) == reference.encode(text)
    assert ours.eot_id == reference.eot_id == 50256
    assert ours.enc.n_vocab == reference.enc.n_vocab == 50257
    assert ours.decode(ours.encode(text)) == text


def test_a_hugging_face_folder_gives_its_own_tokenizer_without_tiktoken(tmp_path, monkeypatch):
    """A Hugging Face folder's vocab.json is OpenAI's encoder.json under another name: the tokenizer is read
    from it (offline, and faster than tiktoken's first load), and encodes as tiktoken does."""
    import shutil

    import loading

    reference = Tokenizer()
    shutil.copy(OPENAI_124M / "encoder.json", tmp_path / "vocab.json")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(loading, "Tokenizer", lambda enc=None: Tokenizer(enc) if enc else 1 / 0)  # no tiktoken
    ours = loading.load_tokenizer(str(tmp_path))
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8")[:5000] + " 日本語 <|endoftext|>"
    assert ours.encode(text) == reference.encode(text) and ours.eot_id == 50256
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(ZeroDivisionError):  # nothing in the folder: tiktoken's it would be
        loading.load_tokenizer(str(tmp_path))


def test_plot_of_single_points_is_not_blank(tmp_path):
    import matplotlib.image

    empty = plots.plot_curves(str(tmp_path / "empty.png"), "epoch", {"loss": {"train": ([], [])}})
    one = plots.plot_curves(str(tmp_path / "one.png"), "epoch",
                             {"loss": {"train": ([1], [0.5]), "val": ([1], [0.7])}})
    a, b = matplotlib.image.imread(empty), matplotlib.image.imread(one)
    assert a.shape == b.shape and (a != b).any(axis=-1).sum() > 20  # the two markers are drawn



# -----------------------------------------------------------------------------
# The number format, the optimizer and the order of the examples.


def test_bfloat16_only_where_the_device_computes_it(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda device_type: True)
    autocast = devices.precision("bfloat16", "cpu")
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16
    monkeypatch.setattr(devices, "native_bf16", lambda device_type: False)
    with pytest.raises(errors.UserError,
                       match="this CPU does not compute bfloat16 natively .* use --dtype float32"):
        devices.precision("bfloat16", "cpu")
    with pytest.raises(errors.UserError, match="--dtype float16 is for GPUs"):
        devices.precision("float16", "cpu")


def test_native_bfloat16_is_the_cpu_flag():
    """On Linux, the answer agrees with the flags the kernel lists for this CPU (AMX or AVX-512 BF16 on
    x86)."""
    flags = open("/proc/cpuinfo").read().split()
    if platform.machine() == "x86_64":
        assert devices.native_bf16("cpu") == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_float32_says_once_when_bfloat16_would_be_faster(tmp_path, monkeypatch, run_main):
    monkeypatch.setattr(devices, "native_bf16", lambda device_type: True)
    r = run_main("train.py", *train_args(train_verdict(tmp_path), tmp_path / "o", "--max-iters", 1))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: this CPU computes bfloat16 natively: --dtype bfloat16 trains faster "
                     "(python bench.py measures by how much on this machine)"]
    assert r.stdout.startswith("note:")
    r = run_main("train.py", *train_args(tmp_path / "the-verdict.txt", tmp_path / "b", "--max-iters", 1,
                                         "--dtype", "bfloat16"))
    assert r.returncode == 0 and "note:" not in r.stdout, r.stderr


def test_bfloat16_training_learns_and_keeps_float32_weights(tmp_path, monkeypatch, run_main):
    """A bfloat16 run (the autocast works on any CPU, only slower without native support): the weights,
    AdamW's state and the checkpoints stay float32, the loss falls as in float32, and the run is recorded."""
    monkeypatch.setattr(devices, "native_bf16", lambda device_type: True)
    data = train_verdict(tmp_path)
    args = ["--max-iters", 10, "--batch-size", 4, "--lr", "1e-2", "--eval-interval", 10, "--dropout", 0]
    for dtype in ("float32", "bfloat16"):
        assert run_main("train.py",
                        *train_args(data, tmp_path / dtype, *args, "--dtype", dtype)).returncode == 0
    f32, bf16 = (train_load(tmp_path / dtype / "ckpt.pt") for dtype in ("float32", "bfloat16"))
    assert bf16["args"]["dtype"] == "bfloat16" \
           and all(t.dtype == torch.float32 for t in bf16["model"].values())
    assert all(t.dtype == torch.float32 for s in bf16["optimizer"]["state"].values() for t in s.values()
               if t.dim())
    assert bf16["history"]["val"][-1] < bf16["history"]["val"][0] - 1.0
    assert abs(bf16["history"]["val"][-1] - f32["history"]["val"][-1]) < 0.1


def test_adamw_is_fused_where_torch_has_it():
    model = tiny_model()
    optimizer = trainer.configure_optimizer(model, 1e-3, 0.1)
    assert optimizer.defaults["fused"] is True
    decayed, plain = optimizer.param_groups  # matrices decay; biases and layer norms do not
    assert all(p.dim() == 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert not trainer.configure_optimizer(model, 1e-3, 0.1, fused=False).defaults["fused"]


def test_each_epoch_trains_on_every_item_once_in_its_own_order():
    n, batch = 23, 4  # 5 steps an epoch: 3 of the 23 items wait for another epoch
    epochs = [[i for step in range(e * 5, e * 5 + 5) for i in trainer.step_items(n, step, batch, seed=9)]
              for e in range(3)]
    for items in epochs:
        assert len(items) == len(set(items)) == 20 and set(items) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert trainer.step_items(n, 7, batch, seed=9) == epochs[1][8:12]  # the same step gives the same items
    assert trainer.step_items(n, 7, batch, seed=10) != epochs[1][8:12]


# -----------------------------------------------------------------------------
# Errors.


def test_tracebacks_on_request(tmp_path, run_main):
    """A bad file is one line; GPT2_DEBUG=1 shows the whole traceback instead, for whoever changes the
    code."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run_main("sample.py", "--model", tmp_path / "junk.pt")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    r = run_main("sample.py", "--model", tmp_path / "junk.pt", env={"GPT2_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "UserError: " in r.stderr and "is not a checkpoint of this project" in r.stderr


def test_messages_from_anywhere_are_one_line_and_whole(capsys):
    """Whatever a user's error holds (a server's HTML page, a library's lines), the script prints it as one
    line, never cut."""
    def main():
        raise errors.UserError("<html>\n  <body>\n   <h1>502 Bad Gateway</h1>\n  </body>\n</html>\n"
                               + "x" * 2000 + " end")

    with pytest.raises(SystemExit) as exit_:
        errors.run(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 \
           and err.startswith("error: <html> <body> <h1>502 Bad Gateway")
    assert err.endswith("x" * 2000 + " end\n")


def test_a_bug_of_ours_shows_its_traceback(tmp_path, monkeypatch, run_main):
    """A ValueError planted in the training loop is not bad input: its traceback, then one line saying it
    is a bug; a missing data file is still one line."""
    def planted(self, stop_requested):
        raise ValueError("planted")

    monkeypatch.setattr(trainer.Trainer, "train_step", planted)
    r = run_main("train.py", *train_args(train_verdict(tmp_path), tmp_path / "o", "--max-iters", 2))
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == ("error: ValueError above is a bug in this project, not in "
                                                  "what you gave it: please report it with the traceback")
    assert "ValueError: planted" in r.stderr
    r = run_main("train.py", *train_args(tmp_path / "missing.txt", tmp_path / "p"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "missing.txt not found" in r.stderr


def test_the_training_scripts_share_their_flags(run_main):
    """--help of train.py, finetune_spam.py and finetune_instruct.py: the same flags, each with its
    default."""
    shared = ["--out-dir", "--overwrite", "--resume", "--max-iters", "--epochs", "--batch-size",
              "--grad-accum", "--context-length", "--lr", "--min-lr", "--warmup-iters", "--weight-decay",
              "--grad-clip", "--eval-interval", "--eval-batches", "--device", "--dtype", "--compile",
              "--seed", "--init-from", "--n-layer", "--n-head", "--n-embd", "--dropout"]
    for script in ("train.py", "finetune_spam.py", "finetune_instruct.py"):
        r = run_main(script, "--help")
        assert r.returncode == 0 and "(default: " in r.stdout, script
        flags = set(re.findall(r"^  (--[a-z-]+)", r.stdout, re.M))
        assert set(shared) <= flags, (script, set(shared) - flags)
        assert not {"--out", "--max-steps", "--max-length"} & flags  # old names: hidden, one line each
    for script in ("sample.py", "download_weights.py", "explore.py", "bench.py"):
        r = run_main(script, "--help")
        assert r.returncode == 0 and "(default: " in r.stdout, script
