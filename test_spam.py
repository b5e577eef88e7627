"""Tests for finetune_spam.py on the real SMS Spam Collection (../shared/data/sms-spam)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_spam as fs
from gpt2 import GPT, GPTConfig, Tokenizer

SPAM_ROOT = Path(__file__).resolve().parent
SPAM_DATA = Path(__file__).resolve().parent.parent / "shared" / "data" / "sms-spam" / "SMSSpamCollection"
SPAM_TINY = ["--init-from", "scratch", "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--context-length", "300"]


def spam_script(*args, cwd):
    return subprocess.run([sys.executable, str(SPAM_ROOT / "finetune_spam.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    """A tiny fine-tuning run on 60 ham and 60 spam lines of the real file."""
    tmp = tmp_path_factory.mktemp("spam")
    lines = SPAM_DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    sample = [l for l in lines if l.startswith("ham\t")][:60] + [l for l in lines if l.startswith("spam\t")][:60]
    (tmp / "sample.tsv").write_text("".join(sample), encoding="utf-8")
    r = spam_script("--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out", "--epochs", "2",
                    "--lr", "1e-3", "--seed", "7", *SPAM_TINY, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp


def test_spam_reads_every_line_of_the_real_file():
    messages = fs.read_messages(SPAM_DATA)
    raw = SPAM_DATA.read_bytes().split(b"\n")
    assert len(messages) == sum(1 for l in raw if l) == 5574
    assert sum(1 for label, _ in messages if label == "spam") == sum(1 for l in raw if l.startswith(b"spam\t")) == 747
    with open(SPAM_DATA, encoding="utf-8", newline="") as f:  # CSV quoting (pandas' default) merges lines
        assert len(list(csv.reader(f, delimiter="\t"))) == 5572


def test_spam_split_is_balanced_deterministic_and_kept(tmp_path):
    messages = fs.read_messages(SPAM_DATA)
    split = fs.balanced_split(messages, 123)
    assert split == fs.balanced_split(messages, 123)
    assert split != fs.balanced_split(messages, 124)
    assert {name: len(ms) for name, ms in split.items()} == {"train": 1045, "validation": 149, "test": 300}
    everything = [m for ms in split.values() for m in ms]
    assert sum(1 for label, _ in everything if label == "spam") == sum(1 for label, _ in everything if label == "ham") == 747
    assert set(everything) <= set(messages) and len(set(everything)) == len(set(map(tuple, everything)))
    fs.write_split(split, tmp_path / "a", 123)
    fs.write_split(fs.balanced_split(messages, 123), tmp_path / "b", 123)
    for name in split:
        a, b = (tmp_path / d / f"{name}-seed123.tsv" for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
        assert fs.read_messages(a) == split[name]


def test_spam_last_real_token_of_padded_batch():
    torch.manual_seed(0)
    model = fs.with_class_head(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=64))).eval()
    tok = Tokenizer()
    texts = ["Hi", "WINNER!! Claim your prize now by calling 09061701461", "see you at 5 then"]
    examples = [(tok.encode(t), i % 2) for i, t in enumerate(texts)]
    idx, lengths, labels = next(fs.batches(examples, 8, "cpu"))
    assert lengths.tolist() == [len(ids) for ids, _ in examples] and labels.tolist() == [0, 1, 0]
    assert idx.shape == (3, max(lengths)) and idx[0, lengths[0]:].eq(fs.PAD_ID).all()
    with torch.no_grad():
        batched = fs.classify(model, idx, lengths)
        alone = torch.cat([fs.classify(model, torch.tensor([ids]), torch.tensor([len(ids)])) for ids, _ in examples])
        at_padding = model.lm_head(model.hidden_states(idx)[:, -1])
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(at_padding[0], alone[0])  # the padding's own state would give another answer


def test_spam_metrics_by_hand():
    m = fs.metrics(preds=[1, 0, 1, 1, 0], labels=[1, 0, 0, 1, 1])  # TP 2, TN 1, FP 1, FN 1
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_spam_freezes_all_but_the_last_blocks():
    model = fs.with_class_head(GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, n_ctx=8)))
    fs.freeze_all_but(model, "1")
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.h.2.ln_1", "transformer.h.2.attn.c_attn", "transformer.h.2.attn.c_proj",
                         "transformer.h.2.ln_2", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj",
                         "transformer.ln_f", "lm_head"}
    assert model.transformer.wte.weight.shape == (50257, 16)  # the new head left the embedding alone


def test_spam_tiny_run_trains_saves_and_classifies(spam_run):
    split = {name: fs.read_messages(spam_run / "split" / f"{name}-seed7.tsv") for name in ("train", "validation", "test")}
    assert {name: len(ms) for name, ms in split.items()} == {"train": 84, "validation": 12, "test": 24}
    report = json.loads((spam_run / "out" / "metrics.json").read_text())
    for name, ms in split.items():
        assert sum(map(sum, report[name]["confusion"])) == len(ms)
        assert 0 <= report[name]["accuracy"] <= 1
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert (spam_run / "out" / "curves.png").stat().st_size > 0
    model = fs.load_classifier(spam_run / "out" / "classifier.pt")
    assert model.lm_head.out_features == 2 and model.config.n_embd == 64
    text = "You won a free cruise, call now"
    r = spam_script("--classify", text, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 0, r.stderr
    label, prob = r.stdout.split()
    ids = torch.tensor([Tokenizer().encode(text)])
    with torch.no_grad():
        probs = torch.softmax(fs.classify(model, ids, torch.tensor([ids.size(1)])), -1)[0]
    assert label == fs.LABELS[int(probs.argmax())] and float(prob) == pytest.approx(probs.max().item(), abs=1e-3)


def test_spam_text_longer_than_context(spam_run):
    r = spam_script("--classify", "free prize " * 200, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 1 and "longer than the model's context (300)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--classify", "hello", "--out-dir", "nowhere"], "no saved classifier at nowhere/classifier.pt"),
    (["--data", "missing.tsv"], "missing.tsv not found"),
    (["--data", "bad.tsv"], "bad.tsv line 2 is not 'ham|spam<TAB>text'"),
    (["--data", "ham-only.tsv"], "has no spam messages"),
    (["--data", str(SPAM_DATA), "--trainable-blocks", "3", *SPAM_TINY], "--trainable-blocks 3: give 'all' or a number from 0 to 2"),
])
def test_spam_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "bad.tsv").write_text("ham\tfine\nthis line has no label\n", encoding="utf-8")
    (tmp_path / "ham-only.tsv").write_text("ham\tone\nham\ttwo\n", encoding="utf-8")
    r = spam_script(*args, "--split-dir", "split", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
