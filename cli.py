"""The command line: the flags every script shares, each checked before any work (a mistyped or out-of-range
flag is one line and exit code 2), and progress bars."""

import argparse
import math
import sys

from devices import check_memory, parameter_count
from errors import UserError
from gpt2 import GPTConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default, and the script's docstring with its example commands as written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A mistyped or out-of-range flag: one line (not the whole usage) and exit code 2."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def argument_parser(doc):
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def number(kind, low, high=math.inf):
    """An argparse type: an int or float (kind) in [low, high], checked before any work starts."""
    what = "an integer" if kind is int else "a number"
    allowed = f"{what} >= {low}" if high == math.inf else f"{what} from {low} to {high}"

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):  # nan and inf fail too
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text}")
        return value
    return check


SEED = number(int, 0, 2**63 - 1)  # --seed's type: what torch.manual_seed takes


class Renamed(argparse.Action):
    """A flag's old name: one line that gives the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.const}")


def add_renamed(parser, old, new):
    parser.add_argument(old, action=Renamed, const=new, nargs="?", help=argparse.SUPPRESS)


def add_overwrite_arg(parser, what):
    parser.add_argument("--overwrite", action="store_true",
                        help=f"start a new run even where {what} already holds one")


def add_device_arg(parser):
    parser.add_argument("--device", default="auto",
                        help="auto: cuda, else mps, else cpu; or a torch device (cpu, cuda:1, ...)")


def add_model_args(parser, init_from, dropout=None):
    """--init-from, the size flags init_model takes and --dropout: the same in every script that trains."""
    parser.add_argument("--init-from", default=init_from,
                        help="scratch, a GPT-2 size (gpt2, gpt2-medium, 124M, ...: see download_weights.py), "
                        "a model folder (OpenAI's or Hugging Face's) or a .pt checkpoint")
    for flag, what in (("--n-layer", "number of blocks"), ("--n-head", "attention heads"),
                       ("--n-embd", "width")):
        parser.add_argument(flag, type=number(int, 1), help=f"with --init-from scratch: {what}; None: 124M's")
    parser.add_argument("--positions", choices=["learned", "rope"],
                        help="with --init-from scratch: GPT-2's learned position vectors or rotary ones "
                        "(docs/positions.md); None: learned")
    parser.add_argument("--dropout", type=number(float, 0, 1), default=dropout,
                        help="dropout rate while training; None: the model's own (0 for OpenAI's)")


def check_size_args(args):
    """The size flags fit together (heads split the width) and the new model fits in memory: checked before
    any work."""
    if args.init_from != "scratch":
        return
    n_head, n_embd = args.n_head or GPTConfig.n_head, args.n_embd or GPTConfig.n_embd
    if n_embd % n_head:
        raise UserError(f"--n-embd {n_embd} must be a multiple of --n-head {n_head} (the heads "
                        "split the width)")
    if args.positions == "rope" and n_embd // n_head % 2:
        raise UserError(f"--positions rope turns pairs of features: --n-embd {n_embd} / --n-head {n_head} "
                        "must be even")
    config = GPTConfig(n_layer=args.n_layer or GPTConfig.n_layer, n_head=n_head, n_embd=n_embd,
                       n_ctx=args.context_length or GPTConfig.n_ctx)
    check_memory(4 * parameter_count(config), "cpu", "the new model's weights",
                 "--n-layer, --n-embd or --context-length")


def progress_bar(iterable=None, **kwargs):
    """tqdm's bar on a terminal; none where stderr goes to a file, which would get a line per update."""
    from tqdm import tqdm

    return tqdm(iterable, **{**kwargs, "disable": kwargs.get("disable") or not sys.stderr.isatty()})
