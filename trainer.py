"""The training loop of train.py, finetune_spam.py and finetune_instruct.py, read top to bottom: each script
gives a Task (its model, its batches, its loss, its evaluation) and the Trainer gives them the same flags,
progress, checkpoints, Ctrl-C and --resume."""

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import SEED, add_device_arg, add_overwrite_arg, add_renamed, number, progress_bar
from devices import DTYPES, keep_freed_memory, precision
from errors import UserError
from files import check_out_files, lock_out_dir, read_checkpoint, save_atomic
from gpt2 import GPT, GPTConfig, load_weights
from loading import init_model
from plots import plot_history

SAVE_EVERY = 600  # seconds: ckpt.pt is saved at an evaluation that comes later than this after the last save
# (and at the end, at Ctrl-C and at SIGTERM). 124M's ckpt.pt is 1.5 GB, 3.6 s to write on a laptop's disk:
# saved at each of the book's run's evaluations it took a fifth of the run.

# -----------------------------------------------------------------------------
# Flags: the same names and meanings in every script that trains.


def add_training_args(parser, **defaults):
    """The flags every training script shares; defaults: the script's own."""
    add = parser.add_argument
    add("--out-dir", default="out",
        help="where ckpt.pt (everything --resume needs), the best model and loss.png go")
    add_overwrite_arg(parser, "--out-dir")
    add("--resume", action="store_true",
        help="continue OUT_DIR/ckpt.pt to the --max-iters or --epochs given now, with its settings: flags "
        "given now override them, except those that fix the model, the data and the batches")
    add("--max-iters", type=number(int, 0), default=0,
        help="optimizer steps; 0: --epochs passes over the data")
    add("--epochs", type=number(int, 1), default=1, help="passes over the training data")
    add("--batch-size", type=number(int, 1), default=8,
        help="examples per optimizer step, over all processes")
    add("--grad-accum", type=number(int, 1), default=1,
        help="micro-batches per step and process: the same steps, in less memory")
    add("--context-length", type=number(int, 1),
        help="tokens per sequence: the model's window is cut to it (a pretrained model keeps its first "
        "positions); None: the model's own")
    add("--lr", type=number(float, 0), default=4e-4, help="peak learning rate")
    add("--min-lr", type=number(float, 0),
        help="learning rate at the end of a cosine decay over all the steps; None: --lr throughout "
        "(constant, as in the book)")
    add("--warmup-iters", type=number(int, 0), default=0, help="steps of linear warmup to --lr")
    add("--weight-decay", type=number(float, 0), default=0.1, help="AdamW's, on weight matrices only")
    add("--beta2", type=number(float, 0, 0.99999), default=0.999, help="AdamW's second-moment decay")
    add("--grad-clip", type=number(float, 0), default=0.0,
        help="clip the gradient norm to this; 0: no clipping")
    add("--eval-interval", type=number(int, 0), default=0,
        help="steps between evaluations; 0: once per epoch")
    add("--eval-batches", type=number(int, 0), default=5, help="batches of each split per evaluation; 0: all")
    add_device_arg(parser)
    add("--dtype", choices=list(DTYPES), default="float32", help="number format of training and evaluation: "
        "bfloat16 where the CPU (AMX, AVX-512 BF16, Arm BF16) or GPU computes it; float16 on GPUs")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=SEED, default=123,
        help="for the initial weights, the order of the data and dropout")
    for old, new in (("--out", "--out-dir"), ("--max-steps", "--max-iters"),
                     ("--max-length", "--context-length")):
        add_renamed(parser, old, new)
    parser.set_defaults(**defaults)


# -----------------------------------------------------------------------------
# Starting: a new run in an out-dir of its own, or the one ckpt.pt left, with its settings.


def start_run(parser, args, out_files, fixed):
    """Before any work: with --resume, OUT_DIR/ckpt.pt and the settings it continues with; else OUT_DIR must
    not hold an earlier run's files (unless --overwrite). One run at a time per OUT_DIR. fixed: the flags
    that cannot change on --resume (the model, the data, which examples each step trains on).
    -> (args, the checkpoint or None)."""
    paths = [os.path.join(args.out_dir, name) for name in ("ckpt.pt", *out_files)]
    lock_out_dir(args.out_dir)  # first: the checks below clear a killed run's temporary files
    if not args.resume:
        check_out_files(paths, args.overwrite, "--resume continues it, ")
        return args, None
    check_out_files(paths, overwrite=True)
    ckpt = read_checkpoint(paths[0], "a checkpoint that --resume can continue",
                           "nothing to resume (drop --resume to start a new run)",
                           needs=("config", "model", "optimizer", "step", "tokens", "history", "args"))
    resumed = parser.parse_args(namespace=argparse.Namespace(**ckpt["args"]))  # fills in only what it lacks
    changed = [k for k in fixed if getattr(resumed, k) != ckpt["args"].get(k)]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} {getattr(resumed, changed[0])} differs from the checkpoint's "
                        f"{ckpt['args'].get(changed[0])}, and it cannot change on --resume: drop {flag}, or "
                        "start a new run in another --out-dir")
    return resumed, ckpt


def build_model(args, ckpt, adapt=lambda model: model):
    """The model to train: new from --init-from (sized by the flags), or as ckpt.pt left it. adapt(model)
    adds what the script trains on top (a class head, LoRA), before ckpt.pt's weights go in."""
    torch.manual_seed(args.seed)  # the initial weights
    if not ckpt:
        model = adapt(init_model(args.init_from, args.context_length, args.dropout, n_layer=args.n_layer,
                                 n_head=args.n_head, n_embd=args.n_embd, positions=args.positions))
    else:
        dropout = ckpt["config"]["dropout"] if args.dropout is None else args.dropout  # may change on resume
        model = adapt(GPT.empty(GPTConfig(**{**ckpt["config"], "dropout": dropout})))
        try:
            load_weights(model, ckpt["model"], os.path.join(args.out_dir, "ckpt.pt"))
        except ValueError as e:  # weights of another model
            raise UserError(str(e)) from None
    for p in model.parameters():  # nn.Linear's layout, whichever load_weights chose for generation on this
        p.data = p.data.contiguous()  # CPU: a resumed run computes with the kernels, so the bits, it resumes
    return model


# -----------------------------------------------------------------------------
# Batches: every step draws its examples from a shuffle of its epoch, so a resumed run sees the same ones.


def check_batches(args, n, what, world=1):
    """--batch-size against the n training examples and the processes -> steps per epoch."""
    if args.batch_size % (world * args.grad_accum) or args.batch_size > n:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of processes ({world}) x "
                        f"--grad-accum ({args.grad_accum}) and at most the {n:,} training {what}")
    return n // args.batch_size


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed):
    """A shuffle of n items, drawn once per epoch: 8 bytes an item (80 MB for 10B tokens in windows of
    1024)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_items(n, step, batch_size, seed):
    """The batch_size items (of n) that optimizer step `step` trains on. Each epoch shuffles all n with a seed
    of its own; an epoch's last partial batch is dropped, as the book's DataLoaders drop it."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(n, seed + epoch)[i * batch_size:(i + 1) * batch_size].tolist()


def micro_batches(examples, step, args, collate, world=1, rank=0):
    """This process's share of the step's examples, in --grad-accum micro-batches, each made by collate."""
    rows = [examples[j] for j in step_items(len(examples), step, args.batch_size, args.seed)]
    size = args.batch_size // (world * args.grad_accum)  # examples per forward pass in each process
    parts = ((m * world + rank) * size for m in range(args.grad_accum))
    return [collate(rows[start:start + size]) for start in parts]


# -----------------------------------------------------------------------------
# The optimizer and its schedule.


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), fused=True):
    """AdamW over the trainable parameters, decaying only matrices (not biases or layer norms); fused
    (one kernel for all parameters: 1.2x faster training on a CPU, bench.py) where torch has it for the
    device. fused=False: torch's default, one kernel per operation over all parameters (foreach)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def learning_rate(step, total, args):
    """Linear warmup to args.lr over args.warmup_iters steps, then a cosine decay that reaches
    args.min_lr at the last of the total steps; args.lr throughout when min_lr is None and no warmup."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    min_lr = args.lr if args.min_lr is None else args.min_lr
    progress = (step - args.warmup_iters) / max(1, total - 1 - args.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


# -----------------------------------------------------------------------------
# The loop.


def lm_loss(model, batch):  # (inputs, targets) -> the next-token loss
    return model(*batch)[1]


@dataclass
class Task:
    """What a script gives the loop."""
    raw: torch.nn.Module  # the model itself: what ckpt.pt saves
    batches: Callable  # step -> this process's micro-batches, each a tuple with the inputs first
    evaluate: Callable  # () -> {"train": loss, "val": loss, ...}, under no_grad, in eval mode
    best: Callable  # () -> what OUT_DIR/best_name holds when "val" is the lowest yet
    steps_per_epoch: int
    loss: Callable = lm_loss  # (model, micro-batch) -> loss
    model: torch.nn.Module = None  # as the loop runs it (DDP, torch.compile); None: raw
    best_name: str = "best.pt"
    sample: Callable = None  # () -> a line of text printed at each evaluation
    patience: int = None  # stop after this many evaluations without a lower "val"


class Trainer:
    """Trains task.raw for --max-iters steps (or --epochs): evaluates every --eval-interval steps and at the
    end, keeps the best model, saves ckpt.pt at most every SAVE_EVERY seconds and at the end; Ctrl-C saves
    after the step and stops; --resume goes on bitwise."""

    def __init__(self, args, task, optimizer, ckpt=None, world=1, rank=0):
        self.args, self.task, self.optimizer, self.world, self.rank = args, task, optimizer, world, rank
        self.model, self.master = task.model or task.raw, rank == 0
        self.total = args.max_iters or args.epochs * task.steps_per_epoch
        device_type = next(task.raw.parameters()).device.type
        self.autocast = precision(args.dtype, device_type, note=False)
        # float16's small gradients are scaled up through backward; otherwise the scaler does nothing
        self.scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == "float16")
        self.step, self.tokens, self.best_val = 0, 0, math.inf
        self.history = {"step": [], "tokens": [], "loss": []}  # per evaluation; "loss": every step's
        torch.manual_seed(args.seed + rank)  # dropout masks: their own stream in each process
        if ckpt:
            self.resume(ckpt)
        self.saved_at = time.time()

    def resume(self, ckpt):
        """The progress ckpt.pt saved, with the optimizer, the scaler and every process's random state."""
        self.step, self.tokens, self.history = ckpt["step"], ckpt["tokens"], ckpt["history"]
        if self.step >= self.total:
            raise UserError(f"{self.args.out_dir}/ckpt.pt is at step {self.step} already, and this run "
                            f"ends at step {self.total}: pass a larger --max-iters (or --epochs) to train on")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt.get("scaler") or {})
        if len(ckpt["rng"]) == self.world:
            torch.set_rng_state(ckpt["rng"][self.rank]["cpu"])
            if "cuda" in ckpt["rng"][self.rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(ckpt["rng"][self.rank]["cuda"])
        elif self.master:
            print(f"note: {len(ckpt['rng'])} processes wrote the checkpoint, {self.world} resume it: dropout "
                  "draws new masks")
        # the best model file may be newer than ckpt.pt: never replace it by a worse one
        best_path, best_val = os.path.join(self.args.out_dir, self.task.best_name), math.inf
        if os.path.isfile(best_path):
            best_val = read_checkpoint(best_path, "a model", "", needs=("val_loss",), mmap=True)["val_loss"]
        self.best_val = min(ckpt["best_val"], best_val)

    def fit(self):
        """-> {"step", "tokens", "best_val", "history", "stopped"}."""
        args, task = self.args, self.task
        keep_freed_memory()
        eval_interval = args.eval_interval or task.steps_per_epoch
        if self.master:
            print(f"{self.total} steps of {args.batch_size} ({task.steps_per_epoch} per epoch), {self.world} "
                  f"process(es), {args.dtype}, from step {self.step}")
        stop, timed = StopRequest(), [0.0, 0, 0]  # seconds, steps, tokens of training alone
        bar = progress_bar(total=self.total, initial=self.step, unit="step", disable=not self.master)
        stopped = patience_out = False
        while True:
            due = self.step % eval_interval == 0 or self.step == self.total
            if due and self.history["step"][-1:] != [self.step]:
                patience_out = self.evaluate(bar)
            if self.step == self.total or patience_out:
                break
            t0 = time.time()
            loss, tokens, stopped = self.train_step(stop.requested)
            dt = time.time() - t0
            timed = [timed[0] + dt, timed[1] + 1, timed[2] + tokens]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}")
            if stopped:
                break
        bar.close()
        stop.restore()
        if self.master and stopped:
            print(f"saving {args.out_dir}/ckpt.pt at step {self.step} ...", file=sys.stderr)
        self.save()
        if self.master:
            plot_history(self.history, os.path.join(args.out_dir, "loss.png"))
            if timed[1]:
                print(f"{timed[1]} steps in {timed[0]:.0f} s, {timed[2] / timed[0]:,.0f} tokens/s "
                      f"(evaluation excluded); {args.out_dir}/ckpt.pt and loss.png written")
            if stopped:
                print(f"stopped at step {self.step}/{self.total}: {' '.join(resume_command(args))} continues")
        return {"step": self.step, "tokens": self.tokens, "best_val": self.best_val, "history": self.history,
                "stopped": stopped}

    def train_step(self, stop_requested):
        """One update from this process's micro-batches -> (the mean loss over all processes, the tokens of
        the step, whether any process got Ctrl-C)."""
        args, model, scaler = self.args, self.model, self.scaler
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.total, args)
        micro, loss_sum = self.task.batches(self.step), 0.0
        for m, batch in enumerate(micro):
            # DDP averages gradients over processes in backward(); only the last micro-batch needs it.
            last = m == len(micro) - 1
            with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                with self.autocast:
                    loss = self.task.loss(model, batch) / len(micro)
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(self.optimizer)  # clip the true gradients
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        report = torch.tensor([loss_sum, float(stop_requested)], device=micro[0][0].device)
        if self.world > 1:
            dist.all_reduce(report)  # the mean loss, and whether any process got Ctrl-C
        loss = report[0].item() / self.world
        if not math.isfinite(loss):
            raise UserError(f"the training loss is {loss} at step {self.step + 1}: training diverged; lower "
                            f"--lr (now {args.lr:g}) or pass --grad-clip 1.0 and run again (ckpt.pt and "
                            f"{self.task.best_name} keep the last good state)")
        tokens = sum(batch[0].numel() for batch in micro) * self.world
        self.history["loss"].append(loss)
        self.step, self.tokens = self.step + 1, self.tokens + tokens
        return loss, tokens, report[1].item() > 0

    def evaluate(self, bar):
        """One evaluation: into the history and printed; the best model file if "val" fell; ckpt.pt between
        the first and the last step if SAVE_EVERY has passed. -> whether patience ran out."""
        task = self.task
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = task.evaluate()
            text = task.sample() if task.sample and self.master else None
        self.model.train()
        for key, value in {"step": self.step, "tokens": self.tokens, **metrics}.items():
            self.history.setdefault(key, []).append(value)
        if self.master:
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.2%}" if "accuracy" in k else f"{k} loss {v:.3f}"
                              for k, v in metrics.items())
            bar.write(f"step {self.step} (epoch {self.step / task.steps_per_epoch:.1f}, {self.tokens:,} "
                      f"tokens): {shown}")
            if text is not None:
                bar.write(f"  {text}")
        if metrics["val"] < self.best_val:  # the best model file only ever gets a better model
            self.best_val = metrics["val"]
            if self.master:
                save_atomic({**task.best(), "step": self.step, "val_loss": metrics["val"]},
                            os.path.join(self.args.out_dir, task.best_name))
        if 0 < self.step < self.total and time.time() - self.saved_at > SAVE_EVERY:
            self.save()
        vals = self.history["val"]
        if task.patience and len(vals) - 1 - vals.index(min(vals)) >= task.patience:
            if self.master:
                bar.write(f"no lower validation loss in {task.patience} evaluations: stopping")
            return True
        return False

    def save(self):
        """ckpt.pt: everything --resume needs. Every process takes part (their random states); rank 0
        writes."""
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        rng = [state] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, state)
        self.saved_at = time.time()
        if self.master:
            save_atomic(self.task.raw.checkpoint(
                optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                tokens=self.tokens, best_val=self.best_val, history=self.history, rng=rng,
                args=vars(self.args)), os.path.join(self.args.out_dir, "ckpt.pt"))


def resume_command(args):
    command = ["python", os.path.basename(sys.argv[0]), "--resume"]
    return command + (["--out-dir", args.out_dir] if args.out_dir != "out" else [])


class StopRequest:
    """Ctrl-C or SIGTERM while training: finish the step, save, stop; never halfway through an update.
    A second Ctrl-C quits at once, unsaved."""

    def __init__(self):
        self.requested = False
        self.saved = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.environ.get("RANK", "0") == "0":  # (each of torchrun's processes is told)
            print("\nstopping: saving after this step (Ctrl-C again quits without saving)", file=sys.stderr)

    def restore(self):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
