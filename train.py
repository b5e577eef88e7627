"""Pretrain GPT-2 on plain text. With no arguments it is the run of Raschka's chapter 5:
GPT-2 124M from scratch on the-verdict.txt, context 256, batch 2, AdamW 4e-4, 10 epochs.

    python train.py                                   # the book's run; writes out/ckpt.pt, out/best.pt, out/loss.png
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    python train.py --data corpus/ --prepare-only     # tokenize into corpus.tokens/ (shards + manifest.json), then exit
    python train.py --data corpus/ --max-iters 5000 --warmup-iters 200 --min-lr 4e-5 --grad-clip 1.0
    torchrun --nproc_per_node=4 train.py --batch-size 8   # data-parallel; same global batch, same losses
    python train.py --eval-only --init-from gpt2 --data some.txt

The text is tokenized once (cached beside it in <data>.tokens/), split by tokens: the first 90% train and the
last 10% validate, each cut into windows of context_length tokens with stride context_length.
"""

import argparse
import bisect
import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from glob import glob

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import UserError, add_device_arg, add_model_args, add_overwrite_arg, argument_parser, check_out_files, check_size_args, configure_optimizer, ensure_file, learning_rate, init_model, load_tokenizer, number, pick_device, plot_curves, run, save_atomic, train_layout, write_json
from gpt2 import GPT, GPTConfig, load_weights

DEFAULT_DATA = "data/the-verdict.txt"
VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
CHUNK_CHARS = 1 << 20  # characters read and encoded at a time: preparation holds a few chunks per worker
WORKERS = os.cpu_count() or 1  # processes that tokenize
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB of uint16), as build-nanogpt's FineWeb shards
TRAIN_FRACTION = 0.9  # of the tokens; the rest is the validation set
PROMPT = "Every effort moves you"  # the book's fixed prompt for the samples printed at each evaluation
SAMPLE_TOKENS = 50
OUT_FILES = ("ckpt.pt", "best.pt", "loss.png")  # what a run writes into --out-dir
# What --resume cannot change: the model, the data and which windows each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "context_length", "batch_size", "seed")

# -----------------------------------------------------------------------------
# Data: text -> cached token ids -> non-overlapping windows.


def text_files(path):
    """A text file, or the .txt files anywhere under a folder, sorted by path."""
    if os.path.isdir(path):
        files = sorted(glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise UserError(f"no .txt files in {path}: --data takes a text file or a folder of .txt files")
        return files
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data takes a text file or a folder of .txt files")
    return [path]


def cut_point(text):
    """The last place text can be cut without changing its tokens, 0 if none: before a newline or
    space that precedes a letter or digit. GPT-2's pre-tokenizer never joins across it (the space
    or newline starts a piece of its own or the next word's; whitespace before it ends a piece
    either way), so encode(a) + encode(b) == encode(a + b)."""
    for sep in "\n ":
        i = len(text)
        while (i := text.rfind(sep, 0, i)) > 0:
            if text[i + 1:i + 2].isalnum():
                return i
    return 0


def read_pieces(files):
    """((file index, is its last piece), text) for pieces of about CHUNK_CHARS characters of each file
    in turn: a file is never held whole, and its pieces encode to exactly the file's tokens."""
    for n, f in enumerate(files):
        try:
            with open(f, encoding="utf-8") as fh:  # text mode decodes characters split between reads
                text = ""
                while block := fh.read(CHUNK_CHARS):
                    text += block
                    if len(block) == CHUNK_CHARS and (cut := cut_point(text)):  # a shorter block ends the file
                        yield (n, False), text[:cut]
                        text = text[cut:]
                yield (n, True), text
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None


worker_tokenizer = None  # in a worker process: the tokenizer it encodes with


def start_worker(tokenizer):
    global worker_tokenizer
    worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then ends the workers


def encode_piece(text, tokenizer=None):
    """text -> (its ids as uint16, its size in bytes), with tokenizer or else the worker's."""
    ids = (tokenizer or worker_tokenizer).encode(text)
    return np.array(ids, dtype=np.uint16), len(text.encode())  # 16 bits hold GPT-2's 50,257 ids


def encode_in_order(tokenizer, pieces, workers):
    """(tag, encode_piece(text)) for each (tag, text) of pieces, in order. With workers > 1 that many
    processes encode, each a piece at a time, and at most 2 x workers pieces are read ahead (threads,
    though tiktoken lets go of the GIL, scaled half as well: 16 reached 4x one, 16 processes 9x);
    with 1, this process encodes."""
    if workers == 1:
        for tag, text in pieces:
            yield tag, encode_piece(text, tokenizer)
        return
    with ProcessPoolExecutor(workers, initializer=start_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for tag, text in pieces:
            pending.append((tag, pool.submit(encode_piece, text)))
            if len(pending) > 2 * workers:
                tag, future = pending.popleft()
                yield tag, future.result()
        for tag, future in pending:
            yield tag, future.result()


def shard_path(cache, i):
    return os.path.join(cache, f"shard_{i:05d}.bin")


class ShardWriter:
    """Appends token ids to a cache's shards, SHARD_TOKENS to a file; `sizes`: the tokens in the shards kept."""

    def __init__(self, cache, sizes):
        self.cache, self.sizes = cache, sizes

    def write(self, ids):
        while len(ids):
            new = not self.sizes or self.sizes[-1] >= SHARD_TOKENS
            if new:
                self.sizes.append(0)
            n = min(len(ids), SHARD_TOKENS - self.sizes[-1])
            with open(shard_path(self.cache, len(self.sizes) - 1), "wb" if new else "ab") as f:
                ids[:n].tofile(f)
            self.sizes[-1] += n
            ids = ids[n:]


class Tokens:
    """The ids in a cache's shards as one sequence, memory-mapped: tokens[a:b] reads just those from disk."""

    def __init__(self, cache, sizes):
        self.shards = [np.memmap(shard_path(cache, i), dtype=np.uint16, mode="r", shape=(n,)) for i, n in enumerate(sizes)]
        self.starts = np.cumsum([0, *sizes]).tolist()  # where each shard begins in the sequence

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, s):
        begin, end, _ = s.indices(len(self))
        parts, i = [], bisect.bisect_right(self.starts, begin) - 1
        while begin < end:  # a window may run over from one shard into the next
            take = min(end, self.starts[i + 1])
            parts.append(self.shards[i][begin - self.starts[i]:take - self.starts[i]])
            begin, i = take, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def unchanged_files(manifest, sources):
    """How many of the first files are as the manifest recorded them: same path, size and modification time."""
    if not manifest or manifest["separator"] != sources["separator"]:
        return 0
    n = 0
    for old, new in zip(manifest["files"], sources["files"]):
        if any(old[k] != new[k] for k in ("path", "bytes", "mtime_ns")):
            break
        n += 1
    return n


def prepare(files, sources, cache, old, keep, tokenizer, workers):
    """Tokenize files[keep:] into the cache's shards after the tokens of files[:keep] (recorded in the old
    manifest), then write the manifest -> the manifest."""
    counts = [f["tokens"] for f in old["files"][:keep]] if keep else []  # each file's tokens
    kept, sizes = sum(counts), []
    for n in old["shards"] if keep else []:  # the shards holding the kept tokens, the last one cut to them
        if sum(sizes) == kept:
            break
        sizes.append(min(n, kept - sum(sizes)))
    try:
        os.makedirs(cache, exist_ok=True)
        if os.path.exists(os.path.join(cache, "manifest.json")):
            os.remove(os.path.join(cache, "manifest.json"))  # shards without a manifest are never trusted
        if sizes:
            os.truncate(shard_path(cache, len(sizes) - 1), 2 * sizes[-1])
    except OSError as e:
        raise UserError(f"cannot write the token cache {cache} ({e.strerror}): put --data in a folder you can write") from None

    counts += [0] * (len(files) - keep)
    writer, eot = ShardWriter(cache, sizes), np.array([tokenizer.eot_id], dtype=np.uint16)
    t0, total = time.time(), sum(f["bytes"] for f in sources["files"][keep:])
    workers = min(workers, 1 + total // CHUNK_CHARS)  # no more than there are pieces: one file of 20 kB needs none
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", delay=1) as bar:
        for (n, last), (ids, size) in encode_in_order(tokenizer, read_pieces(files[keep:]), workers):
            writer.write(ids)
            counts[keep + n] += len(ids)
            if last and sources["separator"]:
                writer.write(eot)
                counts[keep + n] += 1
            bar.update(size)
    for stale in set(glob(os.path.join(cache, "shard_*.bin"))) - {shard_path(cache, i) for i in range(len(writer.sizes))}:
        os.remove(stale)  # a shard of an earlier, longer corpus
    manifest = {**sources, "files": [{**f, "tokens": c} for f, c in zip(sources["files"], counts)],
                "shards": writer.sizes, "tokens": sum(counts)}
    write_json(manifest, os.path.join(cache, "manifest.json"))
    dt, new = time.time() - t0, sum(counts) - kept
    print(f"tokenized {len(files) - keep} of {len(files)} file(s), {total / 1e6:,.1f} MB, into {new:,} tokens in {dt:.1f} s "
          f"({new / max(dt, 1e-9):,.0f} tokens/s, {workers} worker(s)): {cache}")
    return manifest


def load_tokens(path, tokenizer, workers=WORKERS):
    """All of path's text as GPT-2 token ids (Tokens: read lazily), each document of a folder followed
    by <|endoftext|>. They are cached in <path>.tokens/: shards of uint16 and manifest.json, which
    records each file's size and modification time, so that changed or added files are tokenized again."""
    files, cache = text_files(path), os.path.normpath(path) + ".tokens"
    root = path if os.path.isdir(path) else os.path.dirname(path)
    stats = [(os.path.relpath(f, root), os.stat(f)) for f in files]
    sources = {"separator": os.path.isdir(path),  # a folder's documents end with <|endoftext|>, a single file does not
               "files": [{"path": p, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in stats]}
    try:
        with open(os.path.join(cache, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    keep = unchanged_files(manifest, sources)
    if keep < len(files) or len(manifest["files"]) != len(files):
        manifest = prepare(files, sources, cache, manifest, keep, tokenizer, workers)
    return Tokens(cache, manifest["shards"])


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


def get_batch(tokens, starts, context_length, device):
    """Windows starting at starts -> inputs and targets, (len(starts), context_length) each."""
    w = torch.from_numpy(np.stack([tokens[s:s + context_length + 1] for s in starts]).astype(np.int64))
    return w[:, :-1].to(device), w[:, 1:].to(device)


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed):
    """A shuffle of n windows, drawn once per epoch: 8 bytes a window (80 MB for 10B tokens in windows of 1024)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_windows(train_starts, step, batch_size, seed):
    """The batch_size training windows of optimizer step `step`: each epoch shuffles the windows
    with a seed of its own, so a resumed run sees the same batches (an epoch's last partial batch is dropped)."""
    epoch, i = divmod(step, len(train_starts) // batch_size)
    order = epoch_order(len(train_starts), seed + epoch)
    return [train_starts[j] for j in order[i * batch_size:(i + 1) * batch_size].tolist()]


# -----------------------------------------------------------------------------
# Arguments: every flag checked before any work; --resume takes the checkpoint's settings.


def parse_args():
    """-> (args, the checkpoint to resume or None)."""
    parser = argument_parser(__doc__)
    parser.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file or a folder of .txt files "
                        "(the default is downloaded when missing)")
    parser.add_argument("--prepare-only", action="store_true", help="tokenize --data into its cache <data>.tokens/, "
                        "print the number of tokens and exit")
    parser.add_argument("--workers", type=number(int, 1), default=WORKERS, help="processes that tokenize --data "
                        "when its cache is missing or out of date: one per core; 1: no worker processes")
    parser.add_argument("--out-dir", default="out", help="where ckpt.pt (latest), best.pt (best validation loss) and loss.png go")
    add_overwrite_arg(parser, "--out-dir")
    add_model_args(parser, "scratch")
    parser.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt.pt with its settings. Flags given "
                        "now override them, except " + ", ".join("--" + k.replace("_", "-") for k in FIXED_ON_RESUME) +
                        ", which are fixed by the checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="print the loss and perplexity on all of --data, then exit")
    parser.add_argument("--context-length", type=number(int, 1), default=256, help="tokens per window (a pretrained model is cut to it)")
    parser.add_argument("--dropout", type=number(float, 0, 1), default=0.1, help="during training only")
    parser.add_argument("--epochs", type=number(int, 1), default=10, help="passes over the training windows")
    parser.add_argument("--max-iters", type=number(int, 0), default=0, help="optimizer steps; 0: --epochs passes over the data")
    parser.add_argument("--batch-size", type=number(int, 1), default=2, help="windows per optimizer step, over all processes")
    parser.add_argument("--grad-accum", type=number(int, 1), default=1, help="micro-batches per step (each process)")
    parser.add_argument("--lr", type=number(float, 0), default=4e-4, help="peak learning rate")
    parser.add_argument("--min-lr", type=number(float, 0), help="learning rate at the end of the cosine decay; None: --lr (constant, as in the book)")
    parser.add_argument("--warmup-iters", type=number(int, 0), default=0, help="steps of linear warmup")
    parser.add_argument("--weight-decay", type=number(float, 0), default=0.1, help="on weight matrices only")
    parser.add_argument("--beta2", type=number(float, 0, 0.99999), default=0.999, help="AdamW's second-moment decay")
    parser.add_argument("--grad-clip", type=number(float, 0), default=0.0, help="clip the gradient norm to this; 0: no clipping")
    parser.add_argument("--eval-interval", type=number(int, 0), default=0, help="steps between evaluations; 0: once per epoch")
    parser.add_argument("--eval-batches", type=number(int, 1), default=5, help="batches of each split per evaluation (the book's eval_iter)")
    add_device_arg(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=123, help="for the initial weights, the shuffling and dropout")
    args = parser.parse_args()
    check_size_args(args)
    paths = [os.path.join(args.out_dir, name) for name in OUT_FILES]
    if args.eval_only or args.prepare_only:
        return args, None
    if not args.resume:
        check_out_files(paths, args.overwrite, "--resume continues it, ")
        return args, None
    check_out_files(paths, overwrite=True)
    ckpt = load_checkpoint(paths[0])
    # Parse again over the checkpoint's settings: argparse fills in only what the namespace lacks.
    resumed = parser.parse_args(namespace=argparse.Namespace(**ckpt["args"]))
    changed = [k for k in FIXED_ON_RESUME if getattr(resumed, k) != ckpt["args"].get(k)]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} {getattr(resumed, changed[0])} differs from the checkpoint's {ckpt['args'].get(changed[0])}, "
                        f"and it cannot change on --resume: drop {flag}, or start a new run in another --out-dir")
    return resumed, ckpt


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: nothing to resume (drop --resume to start a new run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights only: never runs code
        assert {"config", "model", "optimizer", "step", "history", "args"} <= set(ckpt)
    except Exception:
        raise UserError(f"{path} is not a train.py checkpoint that can be resumed") from None
    return ckpt


# -----------------------------------------------------------------------------
# Setup: the model, the optimizer and the progress so far, new or as the checkpoint left them.


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


def build(args, ckpt, device, rank, world):
    """-> (model, optimizer, progress {"step", "best_val", "history"})."""
    torch.manual_seed(args.seed)  # the initial weights
    if ckpt:
        config = GPTConfig(**{**ckpt["config"], "dropout": args.dropout})  # dropout may change on resume
        model = load_weights(GPT.empty(config), ckpt["model"], os.path.join(args.out_dir, "ckpt.pt"))
    else:
        model = init_model(args.init_from, args.context_length, args.dropout,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    train_layout(model).to(device).train()
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    torch.manual_seed(args.seed + rank)  # dropout masks: their own stream in each process
    if not ckpt:
        history = {"step": [], "tokens": [], "train": [], "val": [], "loss": []}  # "loss": every step's training loss
        return model, optimizer, {"step": 0, "best_val": math.inf, "history": history}
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if "cuda" in ckpt["rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    elif rank == 0:
        print(f"note: {len(ckpt['rng'])} processes wrote the checkpoint, {world} resume it: dropout draws new masks")
    # best.pt may have been written after the last ckpt.pt: never replace it by a worse model
    best_val = min(ckpt["best_val"], saved_val_loss(os.path.join(args.out_dir, "best.pt")))
    return model, optimizer, {"step": ckpt["step"], "best_val": best_val, "history": ckpt["history"]}


def saved_val_loss(path):
    """The validation loss recorded in a best.pt, or infinity when there is none."""
    if not os.path.isfile(path):
        return math.inf
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("val_loss", math.inf)


# -----------------------------------------------------------------------------
# Evaluation, learning rate, checkpoints.


@torch.no_grad()
def evaluate(model, tokens, starts, context_length, batch_size, device, autocast):
    """Mean next-token loss over the windows at starts."""
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(tokens, starts[i:i + batch_size], context_length, device)
        with autocast:
            total += model(x, y)[1].item() * len(x)
    model.train()
    return total / len(starts)


def sample(model, tokenizer, device):
    """The book's check on progress: greedy continuation of PROMPT (greedy draws no random numbers)."""
    model.eval()
    out = model.generate(torch.tensor([tokenizer.encode(PROMPT)], device=device), SAMPLE_TOKENS, temperature=0)
    model.train()
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def rng_states(world):
    """Every process's random state (it draws the dropout masks), as tensors that
    torch.load(weights_only=True) reads back."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def save_latest(model, optimizer, progress, args, world, master):
    """ckpt.pt: everything --resume needs. Every process takes part (their random states); rank 0 writes."""
    rng = rng_states(world)
    if master:
        save_atomic(model.checkpoint(optimizer=optimizer.state_dict(), **progress, rng=rng, args=vars(args)),
                    os.path.join(args.out_dir, "ckpt.pt"))


def train_step(model, optimizer, batches, grad_clip, autocast):
    """One update from this process's micro-batches [(x, y), ...] -> the sum of their losses."""
    loss_sum = 0.0
    for m, (x, y) in enumerate(batches):
        # DDP averages gradients over processes in backward(); only the last micro-batch needs it.
        last = m == len(batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with autocast:
                loss = model(x, y)[1] / len(batches)
            loss.backward()
        loss_sum += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


# -----------------------------------------------------------------------------
# Ctrl-C: finish the step, save, stop; never halfway through an update.

stop_requested = False


def on_ctrl_c(signum, frame):
    global stop_requested
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits at once, unsaved
    stop_requested = True
    print("\nCtrl-C: saving after this step (press again to quit without saving)", file=sys.stderr)


# -----------------------------------------------------------------------------


def main():
    args, ckpt = parse_args()
    rank, world, device = setup_distributed(pick_device(args.device))
    master = rank == 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    tokenizer = load_tokenizer(args.init_from)
    if not master:
        dist.barrier()  # rank 0 downloads and tokenizes; the others then read its cache
    tokens = load_data(args.data, tokenizer, args.workers)
    if master and world > 1:
        dist.barrier()
    if args.prepare_only:
        if master:
            print(f"{len(tokens):,} tokens")
        return

    raw, optimizer, progress = build(args, ckpt, device, rank, world)
    del ckpt
    model = torch.compile(raw) if args.compile else raw
    L = raw.config.n_ctx

    if args.eval_only:
        starts = window_starts(0, len(tokens), L)
        if not starts:
            raise UserError(f"{args.data} has {len(tokens):,} tokens, fewer than one window of {L + 1}")
        loss = evaluate(model, tokens, starts, L, args.batch_size, device, autocast)
        if master:
            print(f"{args.data}: {len(starts)} windows of {L} tokens, loss {loss:.4f}, perplexity {math.exp(loss):.2f}")
        return

    micro = args.batch_size // (world * args.grad_accum)  # windows per forward pass in each process
    if micro * world * args.grad_accum != args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of processes ({world}) x --grad-accum ({args.grad_accum})")
    n_train = int(TRAIN_FRACTION * len(tokens))
    train_starts, val_starts = window_starts(0, n_train, L), window_starts(n_train, len(tokens), L)
    steps_per_epoch = len(train_starts) // args.batch_size
    if not steps_per_epoch or not val_starts:
        raise UserError(f"{args.data} is too short: its {len(tokens):,} tokens give {len(train_starts)} training and "
                        f"{len(val_starts)} validation windows of {L + 1} tokens, and one batch of {args.batch_size} "
                        "and one validation window are needed; use more text or a smaller --context-length or --batch-size")
    total = args.max_iters or args.epochs * steps_per_epoch
    eval_interval = args.eval_interval or steps_per_epoch
    n_eval = args.eval_batches * args.batch_size
    tokens_per_step = args.batch_size * L
    ddp_model = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if world > 1 else model
    signal.signal(signal.SIGINT, on_ctrl_c)
    history = progress["history"]
    if master:
        print(f"{args.data}: {len(tokens):,} tokens, {len(train_starts)} training and {len(val_starts)} validation windows "
              f"of {L}; {steps_per_epoch} steps of {args.batch_size} per epoch, {total} steps, {world} process(es)")
    bar = tqdm(total=total, initial=progress["step"], unit="step", disable=not master)
    train_time, steps_timed, stopped = 0.0, 0, False
    while True:
        step = progress["step"]
        # evaluate-and-save, every eval_interval steps and at the end (not twice for the step a resume starts at)
        if (step % eval_interval == 0 or step == total) and history["step"][-1:] != [step]:
            train_loss = evaluate(model, tokens, train_starts[:n_eval], L, micro, device, autocast)
            val_loss = evaluate(model, tokens, val_starts[:n_eval], L, micro, device, autocast)
            for key, value in zip(("step", "tokens", "train", "val"), (step, step * tokens_per_step, train_loss, val_loss)):
                history[key].append(value)
            if master:
                bar.write(f"step {step} (epoch {step / steps_per_epoch:.1f}, {step * tokens_per_step:,} tokens): "
                          f"train loss {train_loss:.3f} (perplexity {math.exp(train_loss):.1f}), "
                          f"val loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f})")
                bar.write(f"  {sample(raw, tokenizer, device)}")
            if val_loss < progress["best_val"]:  # best.pt only ever gets a better model
                progress["best_val"] = val_loss
                if master:
                    save_atomic(raw.checkpoint(step=step, val_loss=val_loss), os.path.join(args.out_dir, "best.pt"))
            if 0 < step < total:
                save_latest(raw, optimizer, progress, args, world, master)
        if step == total or stopped:
            break

        # the step
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(step, total, args)
        windows = step_windows(train_starts, step, args.batch_size, args.seed)
        mine = [windows[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(args.grad_accum)]
        loss_sum = train_step(ddp_model, optimizer, [get_batch(tokens, w, L, device) for w in mine], args.grad_clip, autocast)
        report = torch.tensor([loss_sum, float(stop_requested)], device=device)
        if world > 1:
            dist.all_reduce(report)  # the mean loss, and whether any process got Ctrl-C
        loss_mean, stopped = report[0].item() / world, report[1].item() > 0
        history["loss"].append(loss_mean)
        progress["step"] += 1
        dt = time.time() - t0
        train_time, steps_timed = train_time + dt, steps_timed + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")

    bar.close()
    save_latest(raw, optimizer, progress, args, world, master)
    step = progress["step"]
    if master:
        plot = plot_curves(os.path.join(args.out_dir, "loss.png"), "tokens seen",
                           {"loss": {"train": (history["tokens"], history["train"]),
                                     "validation": (history["tokens"], history["val"])}})
        if stopped:
            print(f"stopped at step {step}/{total}; saved {args.out_dir}/ckpt.pt: python train.py --resume continues")
        else:
            print(f"done: {total} steps, {step * tokens_per_step:,} tokens; train loss {history['train'][-1]:.3f}, "
                  f"val loss {history['val'][-1]:.3f} (perplexity {math.exp(history['val'][-1]):.1f}); "
                  f"best val loss {progress['best_val']:.3f}")
        if steps_timed:
            print(f"{steps_timed} steps in {train_time:.0f} s, {steps_timed * tokens_per_step / train_time:,.0f} tokens/s "
                  f"(evaluation excluded); wrote {args.out_dir}/ckpt.pt, {args.out_dir}/best.pt, {plot}")
    if world > 1:
        dist.barrier()  # rank 0 may still be plotting: the processes leave gloo together, or one can abort at exit
        dist.destroy_process_group()
    if stopped:
        sys.exit(130)


if __name__ == "__main__":
    run(main)
