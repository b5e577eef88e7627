"""Ctrl-C a training run at random moments, resume it, and check the result is bitwise equal
to a run that was never stopped (weights, optimizer state, loss history).

    python -m tools.stress_resume                   # 20 tries of a tiny model on data/the-verdict.txt
    python -m tools.stress_resume --tries 50 --data the-verdict.txt

Each try starts train.py, waits a random time, sends SIGINT, resumes with --resume and compares
the final ckpt.pt with the uninterrupted run's. The last line says how many were equal.
"""

import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cli import SEED, argument_parser, number
from errors import run

TRAIN = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py")]
TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--context-length", "32", "--batch-size", "2",
        "--max-iters", "40", "--eval-interval", "10", "--dropout", "0.1"]


def start(data, out):
    """Start a tiny training run -> (the process, the time its first best.pt appeared: the evaluation of step
    0)."""
    p = subprocess.Popen([*TRAIN, "--data", data, "--out-dir", out, *TINY], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while not Path(f"{out}/best.pt").exists() and p.poll() is None:
        time.sleep(0.01)
    return p, time.time()


def differences(a, b):
    """Names of what differs between two ckpt.pt dicts, with the largest difference of each tensor."""
    found = [f"{k} (max {(a['model'][k] - b['model'][k]).abs().max().item():.1e})"
             for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    found += [f"optimizer state {i}.{k}" for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i]
              if not torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])]
    return found + (["history"] if a["history"] != b["history"] else [])


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--data", default="data/the-verdict.txt",
                        help="text to train on (copied into a temp folder)")
    parser.add_argument("--tries", type=number(int, 1), default=20, help="interrupted runs to compare")
    parser.add_argument("--seed", type=SEED, default=0, help="for the moments of the Ctrl-C")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = shutil.copy(args.data, Path(tmp) / "data.txt")
        p, first_save = start(data, f"{tmp}/straight")
        p.wait()
        tail = time.time() - first_save  # how long the run goes on after its first checkpoint
        straight = torch.load(f"{tmp}/straight/ckpt.pt", weights_only=True)
        equal = interrupted = 0
        for i in range(args.tries):
            out = f"{tmp}/try{i}"
            p, _ = start(data, out)
            # a random moment after the first evaluation (the tail ends with a plot)
            time.sleep(rng.uniform(0.0, 0.6) * tail)
            p.send_signal(signal.SIGINT)
            if p.wait() != 130:
                print(f"try {i}: finished before the Ctrl-C (exit {p.returncode})")
                continue
            stopped_at = torch.load(f"{out}/ckpt.pt", weights_only=True)["step"]
            subprocess.run([*TRAIN, "--out-dir", out, "--resume"], check=True, capture_output=True)
            found = differences(straight, torch.load(f"{out}/ckpt.pt", weights_only=True))
            interrupted += 1
            equal += not found
            print(f"try {i}: stopped at step {stopped_at}, resumed: "
                  + ("bitwise equal" if not found else "DIFFERENT: " + ", ".join(found[:4])), flush=True)
    print(f"{equal} of {interrupted} interrupted runs resumed bitwise equal to the uninterrupted run")


if __name__ == "__main__":
    run(main)
