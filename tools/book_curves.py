"""The book's chapter-5 run (python train.py) twice, from the two first weights train.py knows, and both
curves in one picture: the book's GPTModel's initialisation memorises the story, GPT-2's does not in 90 steps.

    python -m tools.book_curves                      # out/book-init/, out/gpt2-init/, docs/book-curves.png

A run whose ckpt.pt has finished is not run again.
"""

import os
import subprocess
import sys

import torch

from cli import argument_parser
from errors import run
from plots import plot_curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INITS = ("book", "gpt2")


def main():
    p = argument_parser(__doc__)
    p.add_argument("--out-dir", default="out", help="the runs go to OUT_DIR/<init>-init/")
    p.add_argument("--plot", default="docs/book-curves.png", help="the picture of both runs")
    args = p.parse_args()
    panels = {"training loss": {}, "validation loss": {}}
    for init in INITS:
        folder = os.path.join(args.out_dir, f"{init}-init")
        ckpt_path = os.path.join(folder, "ckpt.pt")
        done = os.path.isfile(ckpt_path) and torch.load(ckpt_path, weights_only=True)["step"] == 90
        if not done:
            command = [sys.executable, os.path.join(ROOT, "train.py"), "--init", init, "--out-dir", folder]
            if subprocess.run(command + (["--overwrite"] if os.path.isdir(folder) else [])).returncode:
                sys.exit(1)
        history = torch.load(ckpt_path, weights_only=True)["history"]
        print(f"--init {init}: train loss {history['train'][-1]:.3f}, val loss {history['val'][-1]:.3f}")
        panels["training loss"][f"--init {init}"] = (history["tokens"], history["train"])
        panels["validation loss"][f"--init {init}"] = (history["tokens"], history["val"])
    print(f"wrote {plot_curves(args.plot, 'tokens seen', panels)}")


if __name__ == "__main__":
    run(main)
