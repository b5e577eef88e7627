"""The training loop of train.py, finetune_spam.py and finetune_instruct.py: each gives its batches,
its loss and its evaluation; the loop gives them the same flags, progress, Ctrl-C and --resume."""

import argparse
import contextlib
import ctypes
import functools
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import add_device_arg, add_overwrite_arg, add_renamed, number
from devices import DTYPES
from errors import UserError
from files import check_out_files, read_checkpoint, save_atomic
from plots import plot_curves


def add_training_args(parser, **defaults):
    """The flags every training script shares, with one name and one meaning; defaults: the script's own."""
    add = parser.add_argument
    add("--out-dir", default="out",
        help="where ckpt.pt (everything --resume needs), the best model and loss.png go")
    add_overwrite_arg(parser, "--out-dir")
    add("--resume", action="store_true",
        help="continue OUT_DIR/ckpt.pt with its settings: flags given now override them, except those that "
        "fix the model, the data and the batches")
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
    add("--seed", type=int, default=123, help="for the initial weights, the order of the data and dropout")
    for old, new in (("--out", "--out-dir"), ("--max-steps", "--max-iters"),
                     ("--max-length", "--context-length")):
        add_renamed(parser, old, new)
    parser.set_defaults(**defaults)


def resume_args(parser, ckpt, fixed):
    """The checkpoint's settings, overridden by the flags given now, except fixed (the flags that fix
    the model, the data and which examples each step trains on): those are an error if they differ."""
    resumed = parser.parse_args(namespace=argparse.Namespace(**ckpt["args"]))  # fills in only what it lacks
    changed = [k for k in fixed if getattr(resumed, k) != ckpt["args"].get(k)]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} {getattr(resumed, changed[0])} differs from the checkpoint's "
                        f"{ckpt['args'].get(changed[0])}, and it cannot change on --resume: drop {flag}, or "
                        "start a new run in another --out-dir")
    return resumed


def start_run(parser, args, out_dir, out_files, fixed):
    """Before any work: with --resume, out_dir/ckpt.pt and the settings it continues with; else out_dir
    must not hold an earlier run's files (unless --overwrite) -> (args, the checkpoint or None)."""
    paths = [os.path.join(out_dir, name) for name in ("ckpt.pt", *out_files)]
    if not args.resume:
        check_out_files(paths, args.overwrite, "--resume continues it, ")
        return args, None
    check_out_files(paths, overwrite=True)
    ckpt = read_checkpoint(paths[0], "a checkpoint that --resume can continue",
                           "nothing to resume (drop --resume to start a new run)",
                           needs=("config", "model", "optimizer", "step", "tokens", "history", "args"))
    return resume_args(parser, ckpt, fixed), ckpt


SAVE_EVERY = 600  # seconds: ckpt.pt is saved at an evaluation that comes later than this after the last save
# (and at the end, at Ctrl-C and at SIGTERM). 124M's ckpt.pt is 1.5 GB, 3.6 s to write on a laptop's disk:
# saved at each of the book's run's evaluations it took a fifth of the run.


def keep_freed_memory():
    """glibc gives every large block back to the system when it is freed, so each training step page-faults
    its big tensors (the 154 MB embedding gradient, the logits) in afresh: a fifth of a CPU step. Keep them:
    large blocks come from the heap, which is never trimmed. (Linux with glibc; elsewhere nothing changes.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


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


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed):
    """A shuffle of n items, drawn once per epoch: 8 bytes an item (80 MB for 10B tokens in windows of
    1024)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_items(n, step, batch_size, seed):
    """The batch_size items (of n) that optimizer step `step` trains on. Each epoch shuffles all n with a seed
    of its own, so a resumed run sees the same batches; an epoch's last partial batch is dropped, as the
    book's DataLoaders drop it."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(n, seed + epoch)[i * batch_size:(i + 1) * batch_size].tolist()


def train(args, model, optimizer, amp, total, steps_per_epoch, micro_batches, loss_of, evaluate, best,
          best_name="best.pt", ckpt=None, raw=None, world=1, rank=0, sample=None, patience=None):
    """Train model (as wrapped for DDP or torch.compile; raw: the model itself) for total steps. Every
    --eval-interval steps and at the end: evaluate() -> {"train": loss, "val": loss, ...}, printed (with
    sample() if given) and kept in the history; a lower "val" writes best() into OUT_DIR/best_name, and
    ckpt.pt is saved if SAVE_EVERY seconds have passed since it last was. A step: this process's
    micro_batches(step) (each a tuple, its input first), their loss_of(model, batch), AdamW. Ctrl-C saves
    after the step and stops; --resume (ckpt) goes on bitwise. patience: stop after that many evaluations
    without a lower "val". -> the progress: "step", "tokens", "best_val", "history" ({"step", "tokens",
    "train", "val", ...} per evaluation, "loss" per step), "stopped"."""
    raw, master = raw or model, rank == 0
    autocast, scaler = amp
    keep_freed_memory()
    torch.manual_seed(args.seed + rank)  # dropout masks: their own stream in each process
    progress = resume_progress(ckpt, optimizer, scaler, os.path.join(args.out_dir, best_name), world, rank)
    progress["saved"] = time.time()  # (not saved in ckpt.pt: see save_latest)
    history, eval_interval = progress["history"], args.eval_interval or steps_per_epoch
    if master:
        print(f"{total} steps of {args.batch_size} ({steps_per_epoch} per epoch), {world} process(es), "
              f"{args.dtype}, from step {progress['step']}")
    stop = StopRequest()
    bar = tqdm_bar(total, progress["step"], disable=not master)
    train_time, steps_timed, tokens_timed, interrupted, patience_out = 0.0, 0, 0, False, False
    while True:
        step = progress["step"]
        if (step % eval_interval == 0 or step == total) and history["step"][-1:] != [step]:
            patience_out = evaluate_and_save(args, model, raw, optimizer, scaler, progress, evaluate,
                                             autocast, best, best_name, step, total, steps_per_epoch, world,
                                             master, bar, sample, patience)
        if step == total or interrupted or patience_out:
            break
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, args)
        micro = micro_batches(step)
        loss_sum = train_step(model, optimizer, scaler, micro, loss_of, autocast, args.grad_clip)
        report = torch.tensor([loss_sum, float(stop.requested)], device=micro[0][0].device)
        if world > 1:
            dist.all_reduce(report)  # the mean loss, and whether any process got Ctrl-C
        loss, interrupted = report[0].item() / world, report[1].item() > 0
        tokens = sum(batch[0].numel() for batch in micro) * world
        history["loss"].append(loss)
        progress["step"], progress["tokens"] = step + 1, progress["tokens"] + tokens
        dt = time.time() - t0
        train_time, steps_timed, tokens_timed = train_time + dt, steps_timed + 1, tokens_timed + tokens
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}")
    bar.close()
    stop.restore()
    save_latest(raw, optimizer, scaler, progress, args, world, master)
    if master:
        plot_history(history, os.path.join(args.out_dir, "loss.png"))
        if steps_timed:
            print(f"{steps_timed} steps in {train_time:.0f} s, {tokens_timed / train_time:,.0f} tokens/s "
                  f"(evaluation excluded); {args.out_dir}/ckpt.pt and loss.png written")
        if interrupted:
            print(f"stopped at step {progress['step']}/{total}: {' '.join(resume_command(args))} continues")
    return {**progress, "stopped": interrupted}  # (and "saved", the time it was)


def resume_command(args):
    command = ["python", os.path.basename(sys.argv[0]), "--resume"]
    return command + (["--out-dir", args.out_dir] if args.out_dir != "out" else [])


def tqdm_bar(total, initial, disable):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=disable, dynamic_ncols=True)


def resume_progress(ckpt, optimizer, scaler, best_path, world, rank):
    """{"step", "tokens", "best_val", "history"}: a new run's, or those ckpt.pt saved, with the optimizer,
    the gradient scaler and every process's random state as they were."""
    if not ckpt:
        history = {"step": [], "tokens": [], "loss": []}  # "loss": every step's training loss
        return {"step": 0, "tokens": 0, "best_val": math.inf, "history": history}
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if "cuda" in ckpt["rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    elif rank == 0:
        print(f"note: {len(ckpt['rng'])} processes wrote the checkpoint, {world} resume it: dropout "
              "draws new masks")
    best_val = math.inf  # the best model file may be newer than ckpt.pt: never replace it by a worse one
    if os.path.isfile(best_path):
        best_val = read_checkpoint(best_path, "a model", "", needs=("val_loss",), mmap=True)["val_loss"]
    return {"step": ckpt["step"], "tokens": ckpt["tokens"], "best_val": min(ckpt["best_val"], best_val),
            "history": ckpt["history"]}


def evaluate_and_save(args, model, raw, optimizer, scaler, progress, evaluate, autocast, best, best_name,
                      step, total, steps_per_epoch, world, master, bar, sample, patience):
    """One evaluation: into the history and printed; best.pt if the validation loss fell; ckpt.pt
    between the first and the last step. -> whether patience ran out."""
    history = progress["history"]
    model.eval()
    with torch.no_grad(), autocast:
        metrics = evaluate()
        text = sample() if sample and master else None
    model.train()
    for key, value in {"step": step, "tokens": progress["tokens"], **metrics}.items():
        history.setdefault(key, []).append(value)
    if master:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.2%}" if "accuracy" in k else f"{k} loss {v:.3f}"
                          for k, v in metrics.items())
        bar.write(f"step {step} (epoch {step / steps_per_epoch:.1f}, {progress['tokens']:,} tokens): {shown}")
        if text is not None:
            bar.write(f"  {text}")
    if metrics["val"] < progress["best_val"]:  # the best model file only ever gets a better model
        progress["best_val"] = metrics["val"]
        if master:
            save_atomic({**best(), "step": step, "val_loss": metrics["val"]},
                        os.path.join(args.out_dir, best_name))
    if 0 < step < total and time.time() - progress["saved"] > SAVE_EVERY:
        save_latest(raw, optimizer, scaler, progress, args, world, master)
    vals = history["val"]
    if patience and len(vals) - 1 - vals.index(min(vals)) >= patience:
        if master:
            bar.write(f"no lower validation loss in {patience} evaluations: stopping")
        return True
    return False


def train_step(model, optimizer, scaler, micro, loss_of, autocast, grad_clip):
    """One update from this process's micro-batches -> the sum of their (scaled) losses."""
    loss_sum = 0.0
    for m, batch in enumerate(micro):
        # DDP averages gradients over processes in backward(); only the last micro-batch needs it.
        last = m == len(micro) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with autocast:
                loss = loss_of(model, batch) / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.item()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


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


def save_latest(raw, optimizer, scaler, progress, args, world, master):
    """ckpt.pt: everything --resume needs. Every process takes part (their random states); rank 0 writes."""
    rng = rng_states(world)
    progress["saved"] = time.time()
    saved = {k: v for k, v in progress.items() if k != "saved"}
    if master:
        save_atomic(raw.checkpoint(optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict() if scaler else None, **saved, rng=rng,
                                   args=vars(args)), os.path.join(args.out_dir, "ckpt.pt"))


class StopRequest:
    """Ctrl-C or SIGTERM while training: finish the step, save, stop; never halfway through an update.
    A second Ctrl-C quits at once, unsaved."""

    def __init__(self):
        self.requested = False
        self.saved = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping: saving after this step (Ctrl-C again quits without saving)", file=sys.stderr)

    def restore(self):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def plot_history(history, path):
    """The losses (and accuracies, where a script measures them) of each evaluation, against tokens seen."""
    tokens = history["tokens"]
    panels = {"loss": {"train": (tokens, history["train"]), "validation": (tokens, history["val"])}}
    if "val_accuracy" in history:
        panels["accuracy"] = {"train": (tokens, history["train_accuracy"]),
                              "validation": (tokens, history["val_accuracy"])}
    return plot_curves(path, "tokens seen", panels)
