"""tools/spam_seeds.py: finetune_spam.py once per seed, finished seeds skipped, then the summary."""

import json
import math
import os

import pytest

import finetune_spam as fs
from tests.helpers import SPAM_TINY, spam_sample
from tools.spam_seeds import seed_list


def test_spam_seeds_one_folder_each_then_the_summary(tmp_path, monkeypatch, run_main):
    spam_sample(tmp_path)
    earlier = tmp_path / "out" / "seed5" / "classifier.pt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run")
    monkeypatch.chdir(tmp_path)
    args = ["--seeds", "3,5", "--out-dir", "out"]
    flags = ["--", "--data", "sample.tsv", "--split-dir", "split", "--epochs", "1", "--lr", "1e-3",
             *SPAM_TINY]
    r = run_main("tools/spam_seeds.py", *args, *flags)
    assert r.returncode == 1 and "out/seed5/classifier.pt is from an earlier run" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "seed3").exists()  # refused before the first seed trained
    r = run_main("tools/spam_seeds.py", *args, "--overwrite", *flags)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "seeds.json").read_text())
    runs = {seed: json.loads((tmp_path / "out" / f"seed{seed}" / "metrics.json").read_text())
            for seed in (3, 5)}
    assert list(summary["seeds"]) == ["3", "5"] and summary["args"]["seeds"] == [3, 5]
    for seed, run in runs.items():
        assert run["args"]["seed"] == seed and (tmp_path / "split" / f"test-seed{seed}.tsv").is_file()
        row = summary["seeds"][str(seed)]
        assert row["test_accuracy"] == run["test"]["accuracy"] \
               and row["val_loss"] == run["validation"]["loss"]
        assert row["cpu_s"] == run["time"]["cpu_s"] > 0 and row["wall_s"] == run["time"]["wall_s"] > 0
    accuracies = [run["test"]["accuracy"] for run in runs.values()]
    assert summary["mean"]["test_accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert summary["worst"]["test_accuracy"] == min(accuracies)
    assert summary["std"]["test_accuracy"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / math.sqrt(2))
    assert "| **worst** |" in r.stdout and fs.load_classifier(earlier).lm_head.out_features == 2
    # run again: both seeds have finished, so nothing trains and the same summary comes back
    before = {seed: (tmp_path / "out" / f"seed{seed}" / "metrics.json").read_bytes() for seed in (3, 5)}
    r = run_main("tools/spam_seeds.py", *args, *flags)
    assert r.returncode == 0 and r.stdout.count("finished, skipped") == 2, r.stderr
    assert all((tmp_path / "out" / f"seed{s}" / "metrics.json").read_bytes() == b for s, b in before.items())
    assert json.loads((tmp_path / "out" / "seeds.json").read_text())["mean"] == summary["mean"]


@pytest.mark.parametrize("seeds, message", [
    ("0-4,4", "must name each seed once"),  # seed 4 twice
    ("5-2", "5-2 is an empty range: write the smaller seed first"),
    # refused before any list is built
    ("0-100000000", "0-100000000 names more than 1000 seeds (a fine-tuning each)"),
    ("one", "must be seeds like 0-9, 1,4,7 or 0-4,9, not one"),
])
def test_spam_seeds_flag_is_checked(tmp_path, seeds, message, run_main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_main("tools/spam_seeds.py", "--seeds", seeds)
    assert r.returncode == 2 and r.stderr.startswith(f"error: argument --seeds: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []
    assert seed_list("0-2,7") == [0, 1, 2, 7]
