"""Pretrain GPT-2 on plain text. With no arguments it is the run of Raschka's chapter 5:
GPT-2 124M from scratch on the-verdict.txt, context 256, batch 2, AdamW 4e-4, 10 epochs.

    python train.py                                   # the book's run; writes out/ckpt.pt, out/best.pt,
                                                      # out/loss.png
    python train.py --dtype bfloat16                  # the same in bfloat16: faster where the CPU computes
                                                      # it (AMX)
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    python train.py --data corpus/ --prepare-only     # tokenize into corpus.tokens/ (see corpus.py),
                                                      # then exit
    python train.py --data corpus/ --max-iters 5000 --warmup-iters 200 --min-lr 4e-5 --grad-clip 1.0
    python train.py --nproc-per-node 4 --batch-size 8     # data-parallel; same global batch, same losses
                                                      # (torchrun --nproc_per_node=4 train.py ... too)
    python train.py --eval-only --init-from gpt2 --data some.txt

The text is tokenized once (corpus.py), then split by tokens: the first 90% train and the last 10%
validate, each cut into windows of context_length tokens with stride context_length.
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import add_model_args, argument_parser, check_size_args, number
from corpus import WORKERS, load_tokens
from devices import check_training_memory, pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from launcher import launch
from loading import check_prerequisites, load_tokenizer
from trainer import Task, Trainer, add_training_args, build_model, check_batches, configure_optimizer, \
    micro_batches, start_run

DEFAULT_DATA = "data/the-verdict.txt"
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
               "the-verdict.txt")
TRAIN_FRACTION = 0.9  # of the tokens; the rest is the validation set
BOOK_CONTEXT = 256  # a new model's window, as in the book (a pretrained one keeps its own)
PROMPT = "Every effort moves you"  # the book's fixed prompt for the samples printed at each evaluation
SAMPLE_TOKENS = 50
OUT_FILES = ("best.pt", "loss.png")  # what a run writes into --out-dir, besides ckpt.pt
# What --resume cannot change: the model, the data and which windows each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "init", "n_layer", "n_head", "n_embd", "positions",
                   "context_length", "batch_size", "seed")


def parse_args():
    """-> (args, the checkpoint to resume or None): every flag checked before any work."""
    parser = argument_parser(__doc__)
    parser.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file or a folder of .txt files "
                        "(the default is downloaded when missing)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="tokenize --data into its cache <data>.tokens/, print the number of "
                        "tokens and exit")
    parser.add_argument("--workers", type=number(int, 1), default=WORKERS,
                        help="processes that tokenize --data when its cache is missing or out of date: one "
                        "per core; 1: no worker processes")
    parser.add_argument("--eval-only", action="store_true",
                        help="print the loss and perplexity on all of --data, then exit")
    add_model_args(parser, "scratch", dropout=0.1)
    parser.add_argument("--init", choices=["gpt2", "book"],
                        help="a new model's first weights: GPT-2's (normal, std 0.02, the head tied to wte) "
                        "or the book's GPTModel's (PyTorch's defaults, a head of its own), which learns the "
                        "story by heart as the book shows; None: book for the book's run (the default --data "
                        "from scratch), gpt2 for every other")
    add_training_args(parser, epochs=10, batch_size=2, lr=4e-4)
    parser.add_argument("--nproc-per-node", type=number(int, 1), default=1,
                        help="processes that train side by side on this machine (one per GPU), each on its "
                        "share of every --batch-size: the losses of one process, in less time")
    args = parser.parse_args()
    book_run = args.data == DEFAULT_DATA and args.init_from == "scratch"
    if args.init is None and not args.resume:
        args.init = "book" if book_run else "gpt2"
    if args.init == "book" and args.init_from != "scratch":
        raise UserError("--init book sets a new model's weights: it goes with --init-from scratch")
    if args.context_length is None and args.init_from == "scratch" and not args.resume:
        args.context_length = BOOK_CONTEXT
    check_size_args(args)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:  # not yet one of the copies launch() starts
        launch(args.nproc_per_node)
    if args.eval_only or args.prepare_only:
        return args, None
    check_prerequisites(args.init_from, args.data, DEFAULT_DATA)
    return start_run(parser, args, OUT_FILES, FIXED_ON_RESUME)


# -----------------------------------------------------------------------------
# Data: cached token ids (corpus.py) -> non-overlapping windows.


def load_data(path, tokenizer, workers):
    if path == DEFAULT_DATA and not os.path.exists(path):
        try:
            ensure_file(path, VERDICT_URL)
        except UserError as e:
            raise UserError(f"{e}, or pass --data FILE") from None
    return load_tokens(path, tokenizer, workers)


def window_starts(begin, end, context_length):
    """Where the windows of tokens[begin:end] start, as in the book: stride = context_length,
    and each window needs context_length + 1 tokens (the targets are the inputs shifted by one).
    A range: window i's start is computed from i, so no list grows with the corpus."""
    return range(begin, end - context_length, context_length)


def split_windows(tokens, context_length, args):
    """The first TRAIN_FRACTION of the tokens train, the rest validate -> the starts of each one's windows."""
    n_train, L = int(TRAIN_FRACTION * len(tokens)), context_length
    train_starts, val_starts = window_starts(0, n_train, L), window_starts(n_train, len(tokens), L)
    if not train_starts or not val_starts:
        raise UserError(f"{args.data} is too short: its {len(tokens):,} tokens give {len(train_starts)} "
                        f"training and {len(val_starts)} validation windows of {L + 1} tokens, and at least "
                        "one of each is needed; use more text or a smaller --context-length")
    return train_starts, val_starts


def get_batch(tokens, starts, context_length, device):
    """Windows starting at starts -> inputs and targets, (len(starts), context_length) each."""
    w = torch.from_numpy(np.stack([tokens[s:s + context_length + 1] for s in starts]).astype(np.int64))
    return w[:, :-1].to(device), w[:, 1:].to(device)


def mean_loss(model, tokens, starts, context_length, batch_size, device):
    """Mean next-token loss over the windows at starts."""
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(tokens, starts[i:i + batch_size], context_length, device)
        total += model(x, y)[1].item() * len(x)
    return total / len(starts)


def continuation(model, tokenizer, device):
    """The book's check on progress: greedy continuation of PROMPT (greedy draws no random numbers)."""
    out = model.generate(torch.tensor([tokenizer.encode(PROMPT)], device=device), SAMPLE_TOKENS,
                         temperature=0)
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def make_model(args, ckpt, device):
    """The model to train: ckpt.pt's, --init-from's, or a new one with the first weights --init names."""
    model = build_model(args, ckpt)
    if not ckpt and args.init == "book":
        book_init(model)
    return model.to(device).train()


def book_init(model):
    """The book's GPTModel: PyTorch's default initialisation of every layer, and an output head of its own.
    Its token vectors start 50 times larger than GPT-2's, which lets 90 steps memorise a 5,000-token story."""
    c = model.config
    c.tied_head, model.lm_head = False, torch.nn.Linear(c.n_embd, c.vocab_size, bias=False)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()
    return model


# -----------------------------------------------------------------------------
# Setup: the processes, the model new or as the checkpoint left it.


def setup_distributed(device):
    """Under torchrun: join the process group -> (rank, number of processes, this process's device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


# -----------------------------------------------------------------------------


def main():
    args, ckpt = parse_args()
    rank, world, device = setup_distributed(pick_device(args.device))
    master = rank == 0
    autocast = precision(args.dtype, device, note=master)
    tokenizer = load_tokenizer(args.init_from)
    # A model read from a file before the data: what it refuses (a longer --context-length than it has, ...)
    # is said before the data is downloaded or tokenized. A new one after: a window longer than the corpus is
    # said before a model that large is allocated.
    new_model = args.init_from == "scratch" and not ckpt
    raw = None if args.prepare_only or new_model else make_model(args, ckpt, device)
    if not master:
        dist.barrier()  # rank 0 downloads and tokenizes; the others then read its cache
    tokens = load_data(args.data, tokenizer, args.workers)
    if master and world > 1:
        dist.barrier()
    if args.prepare_only:
        if master:
            print(f"{len(tokens):,} tokens")
        return

    if new_model:
        split_windows(tokens, args.context_length, args)
        raw = make_model(args, ckpt, device)
    model = torch.compile(raw) if args.compile else raw
    L = raw.config.n_ctx
    if args.eval_only:
        starts = window_starts(0, len(tokens), L)
        if not starts:
            raise UserError(f"{args.data} has {len(tokens):,} tokens, fewer than one window of {L + 1}")
        model.eval()
        with torch.no_grad(), autocast:
            loss = mean_loss(model, tokens, starts, L, args.batch_size, device)
        if master:
            print(f"{args.data}: {len(starts)} windows of {L} tokens, loss {loss:.4f}, perplexity "
                  f"{math.exp(loss):.2f}")
        return

    train_starts, val_starts = split_windows(tokens, L, args)
    steps_per_epoch = check_batches(args, len(train_starts), "windows", world)
    micro = args.batch_size // (world * args.grad_accum)  # windows per forward pass in each process
    n_eval = args.eval_batches * args.batch_size or None  # None: every window
    if master:
        print(f"{args.data}: {len(tokens):,} tokens, {len(train_starts)} training and {len(val_starts)} "
              f"validation windows of {L}")
    check_training_memory(raw, micro * L, args.dtype, device)
    optimizer = configure_optimizer(raw, args.lr, args.weight_decay, betas=(0.9, args.beta2))

    def batches(step):  # this process's windows of the step
        return micro_batches(train_starts, step, args, lambda s: get_batch(tokens, s, L, device), world, rank)

    def evaluate():
        return {split: mean_loss(model, tokens, starts[:n_eval], L, micro, device)
                for split, starts in (("train", train_starts), ("val", val_starts))}

    ddp = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if world > 1 else model
    task = Task(raw, batches, evaluate, best=raw.checkpoint, steps_per_epoch=steps_per_epoch, model=ddp,
                sample=lambda: continuation(raw, tokenizer, device))
    progress = Trainer(args, task, optimizer, ckpt, world, rank).fit()
    history = progress["history"]
    if master and not progress["stopped"]:
        print(f"done: {progress['step']} steps, {progress['tokens']:,} tokens; train loss "
              f"{history['train'][-1]:.3f}, val loss {history['val'][-1]:.3f} (perplexity "
              f"{math.exp(history['val'][-1]):.1f}); best val loss {progress['best_val']:.3f} in "
              f"{args.out_dir}/best.pt")
    if world > 1:
        # rank 0 may still be plotting: the processes leave gloo together, or one can abort at exit
        dist.barrier()
        dist.destroy_process_group()
    if progress["stopped"]:
        sys.exit(130)


if __name__ == "__main__":
    run(main)
