"""Whole train.py runs, start to end, in each training setting bench.py measures a step in: the book's
run on the-verdict.txt and the Tiny Shakespeare recipe, each in a fresh process on a copy of the text.

    python -m tools.bench_runs --verdict the-verdict.txt --shakespeare tinyshakespeare.txt
"""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from cli import add_device_arg, argument_parser
from devices import native_bf16, pick_device
from errors import run
from measure import HERE, TRAINING, in_fresh_process


def training_run(argv, fused):
    """Run in a fresh process: train.py with argv, its AdamW fused, or with torch's defaults (foreach
    AdamW, and glibc's default of giving freed memory back) -> (seconds from start to end, the final
    validation loss, tokens trained on)."""
    import train
    import trainer

    train.configure_optimizer = functools.partial(trainer.configure_optimizer, fused=fused)
    if not fused:
        trainer.keep_freed_memory = lambda: None
    sys.argv = ["train.py", *argv]
    t0 = time.perf_counter()
    train.main()
    seconds = time.perf_counter() - t0
    ckpt = torch.load(os.path.join(argv[argv.index("--out-dir") + 1], "ckpt.pt"), weights_only=True)
    return seconds, ckpt["history"]["val"][-1], ckpt["tokens"]


SHAKESPEARE_RUN = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--context-length", "128",
                   "--batch-size", "2", "--max-iters", "800", "--warmup-iters", "40", "--lr", "1e-3",
                   "--min-lr", "1e-4", "--beta2", "0.95", "--dropout", "0", "--eval-interval", "100",
                   "--eval-batches", "10"]


def whole_runs(args):
    """train.py on the-verdict.txt with its defaults (the book's run) and the Tiny Shakespeare recipe, in
    each TRAINING setting, each in a fresh process on a copy of the text -> Markdown rows."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text, extra in (("the book's run", args.verdict, []), ("Tiny Shakespeare", args.shakespeare,
                                                                         SHAKESPEARE_RUN)):
            data = shutil.copy(text, os.path.join(tmp, os.path.basename(text)))
            subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--data", data, "--prepare-only"],
                           check=True, capture_output=True)  # tokenized once, before the timed runs
            first = None
            for setting, (dtype, fused) in TRAINING.items():
                if dtype == "bfloat16" and not native_bf16(args.device):
                    continue
                argv = ["--data", data, "--out-dir", os.path.join(tmp, "out"), "--overwrite",
                        "--device", args.device, "--dtype", dtype, *extra]
                seconds, val, tokens = in_fresh_process("tools.bench_runs", "training_run", argv, fused)
                first = first or seconds
                rows.append((name, setting, f"{seconds:.0f} s", f"{tokens / seconds:,.0f}", f"{val:.3f}",
                             f"{first / seconds:.2f}x"))
    print("\n| train.py run | setting | start to end | tokens/s | final val loss | speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# -----------------------------------------------------------------------------


def main():
    p = argument_parser(__doc__)
    p.add_argument("--verdict", default="data/the-verdict.txt", help="the text of the book's run")
    p.add_argument("--shakespeare", default="data/tinyshakespeare.txt", help="Tiny Shakespeare's text")
    add_device_arg(p)
    args = p.parse_args()
    args.device = pick_device(args.device)
    whole_runs(args)


if __name__ == "__main__":
    run(main)
