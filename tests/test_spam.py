"""finetune_spam.py: the real SMS Spam Collection."""

import csv
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune_spam as fs
import sms_spam
import trainer
from gpt2 import GPT, GPTConfig, Tokenizer
from tests.helpers import (EOT, ROOT, SPAM_DATA, SPAM_TINY, assert_bitwise_equal, one_line_error,
                           run_in_process, spam_sample, stop_then_resume)


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    """A tiny fine-tuning run on 60 ham and 60 spam lines of the real file."""
    tmp = tmp_path_factory.mktemp("spam")
    spam_sample(tmp)
    r = run_in_process("finetune_spam.py", "--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out",
                       "--epochs", "2", "--lr", "1e-3", "--seed", "7", *SPAM_TINY, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp


def test_spam_reads_every_line_of_the_real_file():
    messages = sms_spam.read_messages(SPAM_DATA)
    raw = SPAM_DATA.read_bytes().split(b"\n")
    assert len(messages) == sum(1 for l in raw if l) == 5574
    assert sum(1 for label, _ in messages if label == "spam") \
           == sum(1 for l in raw if l.startswith(b"spam\t")) == 747
    with open(SPAM_DATA, encoding="utf-8", newline="") as f:  # CSV quoting (pandas' default) merges lines
        assert len(list(csv.reader(f, delimiter="\t"))) == 5572


def test_spam_split_is_balanced_deterministic_and_kept(tmp_path):
    messages = sms_spam.read_messages(SPAM_DATA)
    split = sms_spam.balanced_split(messages, 123)
    assert split == sms_spam.balanced_split(messages, 123)
    assert split != sms_spam.balanced_split(messages, 124)
    assert {name: len(ms) for name, ms in split.items()} == {"train": 1045, "validation": 149, "test": 300}
    everything = [m for ms in split.values() for m in ms]
    assert sum(1 for label, _ in everything if label == "spam") \
           == sum(1 for label, _ in everything if label == "ham") == 747
    # each line of the file at most once over the three parts (by identity: the file repeats some texts)
    lines = {id(m) for m in messages}
    assert all(id(m) in lines for m in everything) and len({id(m) for m in everything}) == len(everything)
    sms_spam.write_split(split, tmp_path / "a", 123, overwrite=False)
    sms_spam.write_split(sms_spam.balanced_split(messages, 123), tmp_path / "b", 123, overwrite=False)
    for name in split:
        a, b = (tmp_path / d / f"{name}-seed123.tsv" for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
        assert sms_spam.read_messages(a) == split[name]


def test_spam_last_real_token_of_padded_batch():
    torch.manual_seed(0)
    model = fs.with_class_head(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=64))).eval()
    tok = Tokenizer()
    texts = ["Hi", "WINNER!! Claim your prize now by calling 09061701461", "see you at 5 then"]
    examples = [(tok.encode(t), i % 2) for i, t in enumerate(texts)]
    idx, lengths, labels = fs.collate(examples, EOT, "cpu")
    assert lengths.tolist() == [len(ids) for ids, _ in examples] and labels.tolist() == [0, 1, 0]
    assert idx.shape == (3, max(lengths)) and idx[0, lengths[0]:].eq(EOT).all()
    with torch.no_grad():
        batched = fs.classify(model, idx, lengths)
        alone = torch.cat([fs.classify(model, torch.tensor([ids]), torch.tensor([len(ids)]))
                           for ids, _ in examples])
        at_padding = model.lm_head(model.hidden_states(idx)[:, -1])
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(at_padding[0], alone[0])  # the padding's own state would give another answer
    model.pool = "mean"  # the mean over the real tokens: the padding does not count either
    with torch.no_grad():
        batched = fs.classify(model, idx, lengths)
        alone = torch.cat([fs.classify(model, torch.tensor([ids]), torch.tensor([len(ids)]))
                           for ids, _ in examples])
    torch.testing.assert_close(batched, alone)


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


def test_spam_learning_rate_schedule():
    constant = fs.parser().parse_args(["--lr", "1e-3"])
    assert {trainer.learning_rate(step, 100, constant) for step in range(100)} == {1e-3}
    cosine = fs.parser().parse_args(["--lr", "1e-3", "--min-lr", "1e-5", "--warmup-iters", "10"])
    lrs = [trainer.learning_rate(step, 100, cosine) for step in range(100)]
    # linear warmup, --lr at step 9
    assert lrs[:10] == pytest.approx([1e-4 * (step + 1) for step in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)  # then cosine down to --min-lr
    assert lrs[(10 + 99) // 2] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.05)  # halfway down halfway through
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_spam_tiny_run_trains_saves_and_classifies(spam_run, run_main):
    split = {name: sms_spam.read_messages(spam_run / "split" / f"{name}-seed7.tsv")
             for name in ("train", "validation", "test")}
    assert {name: len(ms) for name, ms in split.items()} == {"train": 84, "validation": 12, "test": 24}
    report = json.loads((spam_run / "out" / "metrics.json").read_text())
    for name, ms in split.items():
        assert sum(map(sum, report[name]["confusion"])) == len(ms)
    # it learned: the training loss fell each epoch (10 steps of 8 of its 84 messages), to well under a
    # coin toss's ln 2 ...
    history = report["history"]
    assert history["step"] == [0, 10, 20] and history["train"][0] > history["train"][1] > history["train"][2]
    assert history["val_accuracy"][-1] == report["validation"]["accuracy"] and report["best_step"] == 20
    assert report["train"]["loss"] < 0.5 * math.log(2)

    # ... and it beats always answering the larger class, clearly on train and also on unseen messages
    def majority(names):
        return max(sum(label == c for name in names for label, _ in split[name])
                   for c in fs.LABELS) / sum(len(split[n]) for n in names)

    def accuracy(names):
        right = sum(report[n]["confusion"][0][0] + report[n]["confusion"][1][1] for n in names)
        return right / sum(len(split[n]) for n in names)

    assert accuracy(["train"]) > majority(["train"]) + 0.3
    assert accuracy(["validation", "test"]) > majority(["validation", "test"]) + 0.1
    assert (spam_run / "out" / "loss.png").stat().st_size > 0
    model = fs.load_classifier(spam_run / "out" / "classifier.pt")
    assert model.lm_head.out_features == 2 and model.config.n_embd == 64
    text = "You won a free cruise, call now"
    r = run_main("finetune_spam.py", "--classify", text, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 0, r.stderr
    label, prob = r.stdout.split()
    ids = torch.tensor([Tokenizer().encode(text)])
    with torch.no_grad():
        probs = torch.softmax(fs.classify(model, ids, torch.tensor([ids.size(1)])), -1)[0]
    assert label == fs.LABELS[int(probs.argmax())] \
           and float(prob) == pytest.approx(probs.max().item(), abs=1e-3)


def test_spam_patience_stops_and_pool_is_kept(tmp_path, run_main):
    spam_sample(tmp_path)
    # lr 0: the validation loss never falls below step 0's, so patience 2 stops at the second evaluation after
    r = run_main("finetune_spam.py", "--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out",
                 "--epochs", "5", "--patience", "2", "--lr", "0", "--pool", "mean",
                 "--label-smoothing", "0.1", "--grad-clip", "1", *SPAM_TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["history"]["step"] == [0, 10, 20] and report["best_step"] == 0
    assert fs.load_classifier(tmp_path / "out" / "classifier.pt").pool == "mean"


def test_spam_text_longer_than_context(spam_run, run_main):
    r = run_main("finetune_spam.py", "--classify", "free prize " * 200, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 1 and "longer than the model's context (300)" in r.stderr \
           and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--classify", "hello", "--out-dir", "nowhere"],
     "nowhere/classifier.pt not found: train one first with"),
    (["--data", "missing.tsv"], "missing.tsv not found"),
    (["--data", "bad.tsv"], "bad.tsv line 2 is not 'ham|spam<TAB>text'"),
    (["--data", "ham-only.tsv"], "has no spam messages"),
    (["--data", str(SPAM_DATA), "--trainable-blocks", "3", *SPAM_TINY],
     "--trainable-blocks 3: give 'all' or a number from 0 to 2"),
])
def test_spam_bad_input_is_one_clear_line(tmp_path, args, message, run_main):
    (tmp_path / "bad.tsv").write_text("ham\tfine\nthis line has no label\n", encoding="utf-8")
    (tmp_path / "ham-only.tsv").write_text("ham\tone\nham\ttwo\n", encoding="utf-8")
    r = run_main("finetune_spam.py", *SPAM_TINY, *args, "--split-dir", "split", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_spam_data_too_small_to_split(tmp_path, run_main):
    (tmp_path / "two.tsv").write_text("ham\thello\nspam\tWIN NOW\n", encoding="utf-8")
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", tmp_path / "two.tsv",
                                   "--out-dir", tmp_path / "o", "--split-dir", tmp_path / "s"))
    assert "2 balanced messages (1 spam) are too few to split" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_spam_resume_after_ctrl_c_is_bitwise_exact(tmp_path, run_main):
    """Ctrl-C after the first checkpoint, then --resume: the classifier, AdamW's state and the history of
    a run never stopped, bit for bit (dropout on: the random state is restored too)."""
    spam_sample(tmp_path)
    args = ["--data", "sample.tsv", "--split-dir", "split", "--max-iters", 40, "--eval-interval", 5,
            "--eval-batches", 1, "--lr", "1e-3", "--dropout", 0.1, "--trainable-blocks", "all", *SPAM_TINY]
    a, b, stopped_at, stdout = stop_then_resume("finetune_spam.py", args, "straight", "stopped", run_main,
                                                cwd=tmp_path)
    assert 1 <= stopped_at < 40 and "python finetune_spam.py --resume --out-dir stopped continues" in stdout
    assert a["step"] == 40
    assert_bitwise_equal(a, b)
    best = [torch.load(tmp_path / run / "classifier.pt", weights_only=True)
            for run in ("straight", "stopped")]
    assert best[0]["step"] == best[1]["step"] \
           and all(torch.equal(v, best[1]["model"][k]) for k, v in best[0]["model"].items())


def test_spam_default_data_offline_names_every_form_it_takes(tmp_path, run_main):
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = run_main("finetune_spam.py", *SPAM_TINY, cwd=tmp_path, env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "data/sms-spam/sms+spam+collection.zip" in last  # the zip, as UCI has it
    assert "or put the unzipped SMSSpamCollection at data/sms-spam/SMSSpamCollection" in last
    assert "or pass --data FILE" in last


def test_spam_classifier_of_an_unfinished_run_says_so(tmp_path, run_main):
    spam_sample(tmp_path)
    args = ["--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out", *SPAM_TINY,
            "--eval-interval", "2"]
    p = subprocess.Popen([sys.executable, str(ROOT / "finetune_spam.py"), *args, "--max-iters", "400"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "classifier.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    r = run_main("finetune_spam.py", "--classify", "Call now to win", "--out-dir", "out", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split()[0] in ("ham", "spam"), r.stderr
    assert "of a run that has not finished: python finetune_spam.py --resume --out-dir out finishes it" \
           in r.stderr
    r = run_main("finetune_spam.py", *args, "--max-iters", 2, "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_main("finetune_spam.py", "--classify", "Call now to win", "--out-dir", "out", cwd=tmp_path)
    assert r.returncode == 0 and "not finished" not in r.stderr
