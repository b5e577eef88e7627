"""finetune_spam.py once per seed, then the mean, spread and worst over the seeds: how much of a recipe's
accuracy is the recipe and how much the draw of the split and the initial weights.

    python -m tools.spam_seeds --seeds 0-9 --out-dir out/spam-seeds -- --init-from scratch --n-layer 4 \\
        --n-head 4 --n-embd 128 --context-length 300 --trainable-blocks all --dropout 0.1 --lr 1e-3

Each seed runs in OUT_DIR/seed<S>/ with the flags after --. A seed whose metrics.json is there has finished
and is skipped, one with only a ckpt.pt is resumed, so running the command again finishes a sweep that was
stopped. OUT_DIR/seeds.json and a Markdown table follow.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from cli import argument_parser
from errors import UserError, run
from files import check_out_files, write_json
from finetune_spam import OUT_FILES

MAX_SEEDS = 1000  # one fine-tuning per seed, a minute or more each
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "finetune_spam.py")


def seed_list(text):
    """An argparse type: '0-9', '1,4,7' or '0-4,9' -> the list of seeds, in order, each once."""
    seeds = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            low, high = int(low), int(high) if dash else int(low)
            if high < low:
                raise argparse.ArgumentTypeError(f"{part.strip()} is an empty range: write the "
                                                 "smaller seed first")
            if len(seeds) + high - low + 1 > MAX_SEEDS:
                raise argparse.ArgumentTypeError(f"{text} names more than {MAX_SEEDS} seeds (a "
                                                 "fine-tuning each)")
            seeds += range(low, high + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seeds like 0-9, 1,4,7 or 0-4,9, not {text}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must name each seed once (like 0-9), not {text}")
    return seeds


def plan(seeds, out_dir, overwrite):
    """{seed: (its out-dir, "new" | "resume" | "done")}, every seed checked before the first one trains."""
    runs = {}
    for seed in seeds:
        folder = os.path.join(out_dir, f"seed{seed}")
        if not overwrite and os.path.isfile(os.path.join(folder, "metrics.json")):
            runs[seed] = folder, "done"
        elif not overwrite and os.path.isfile(os.path.join(folder, "ckpt.pt")):
            runs[seed] = folder, "resume"
        else:
            check_out_files([os.path.join(folder, name) for name in ("ckpt.pt", *OUT_FILES)], overwrite)
            runs[seed] = folder, "new"
    return runs


def summarize(reports):
    """Per seed: best epoch, validation and test metrics, times; over the seeds: mean, std (n - 1) and
    worst."""
    rows = {seed: {"best_epoch": r["best_epoch"], "val_loss": r["validation"]["loss"],
                   "val_accuracy": r["validation"]["accuracy"],
                   **{f"test_{k}": r["test"][k] for k in ("loss", "accuracy", "precision", "recall", "f1")},
                   "wall_s": r["time"]["wall_s"], "cpu_s": r["time"]["cpu_s"]} for seed, r in reports.items()}
    columns = list(next(iter(rows.values())))
    values = {c: [row[c] for row in rows.values()] for c in columns}
    mean = {c: statistics.fmean(v) for c, v in values.items()}
    std = {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in values.items()}
    worst = {c: (max if c.endswith(("loss", "_s")) else min)(v) for c, v in values.items()
             if c != "best_epoch"}
    return {"seeds": rows, "mean": mean, "std": std, "worst": worst}


def print_summary(summary):
    """A Markdown table: one row per seed, then the mean, the standard deviation and the worst."""
    def pct(x):
        return f"{x:.2%}".replace("%", " %")

    print("| seed | best epoch | val loss | val accuracy | test accuracy | test precision / recall / F1 | "
          "wall | CPU time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [*summary["seeds"].items(), ("**mean**", summary["mean"]), ("std", summary["std"]),
            ("**worst**", summary["worst"])]
    for name, r in rows:
        epoch = f"{r['best_epoch']:.3g}" if "best_epoch" in r else ""
        print(f"| {name} | {epoch} | {r['val_loss']:.4f} | {pct(r['val_accuracy'])} | "
              f"{pct(r['test_accuracy'])} | {pct(r['test_precision'])} / {pct(r['test_recall'])} / "
              f"{pct(r['test_f1'])} | {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s |")



def main():
    p = argument_parser(__doc__)
    p.add_argument("--seeds", type=seed_list, default=list(range(10)), help="0-9, 1,4,7, 0-4,9, ...")
    p.add_argument("--out-dir", default="out/spam-seeds", help="each seed's run goes to OUT_DIR/seed<S>/")
    p.add_argument("--overwrite", action="store_true", help="run every seed anew, finished ones too")
    p.add_argument("flags", nargs=argparse.REMAINDER,
                   help="after --: finetune_spam.py's flags for every seed")
    args = p.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if any(f in ("--seed", "--out-dir", "--resume") for f in flags):
        raise UserError("--seed, --out-dir and --resume are the sweep's to set: leave them out of the flags")
    runs = plan(args.seeds, args.out_dir, args.overwrite)
    summary_path = os.path.join(args.out_dir, "seeds.json")
    reports = {}
    for n, (seed, (folder, state)) in enumerate(runs.items(), 1):
        done = state == "done"
        print(f"\n=== seed {seed} ({n} of {len(runs)}) -> {folder}" + (": finished, skipped" if done else ""),
              flush=True)
        if not done:
            extra = ["--resume"] if state == "resume" else ["--overwrite"] if args.overwrite else []
            r = subprocess.run([sys.executable, SCRIPT, *flags, "--seed", str(seed), "--out-dir", folder,
                                *extra])
            if r.returncode:
                sys.exit(r.returncode)  # the run said why; a Ctrl-C stops the sweep (run again to go on)
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            reports[seed] = json.load(f)
    summary = summarize(reports)
    write_json({**summary, "args": {"seeds": args.seeds, "flags": flags}}, summary_path)
    print(f"\n{len(reports)} seeds; summary in {summary_path}\n")
    print_summary(summary)


if __name__ == "__main__":
    run(main)
