"""Measuring on this machine: runs timed side by side, memory peaks, fresh processes, and the machine's
own limits (matmul peak, memory bandwidth) that a model's figures are read against. bench.py's tools."""

import importlib
import multiprocessing
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.nn import functional as F
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINING = {  # the training rows: setting -> (number format, fused AdamW)
    # (and in tools/bench_runs.py, glibc's default: see keep_freed_memory)
    "float32, torch's defaults (foreach AdamW)": ("float32", False),
    "float32, fused AdamW": ("float32", True),
    "bfloat16 autocast, fused AdamW": ("bfloat16", True),
}


def sync(device):
    if device != "cpu":
        getattr(torch, device).synchronize()  # GPU work is asynchronous: wait before reading the clock


def timed(fns, args, desc):
    """{name: fn} -> {name: median seconds}. Runs alternate, the order flipping each round."""
    times = {name: [] for name in fns}
    order = list(fns)
    with tqdm(total=(args.warmup + args.reps) * len(fns), desc=desc, leave=False) as bar:
        for i in range(args.warmup + args.reps):
            for name in order if i % 2 == 0 else order[::-1]:
                sync(args.device)
                t0 = time.perf_counter()
                fns[name]()
                sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                bar.update()
    return {name: statistics.median(ts) for name, ts in times.items()}


def rss(field="VmRSS"):
    """This process's resident memory in bytes (Linux): VmRSS now, VmHWM the peak since reset_peak()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: the peak (VmHWM) restarts from the current RSS


def memory_now_and_peak(device):
    if device == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return rss("VmRSS"), rss("VmHWM")


def in_fresh_process(module, fn, *fn_args):
    """module.fn(*fn_args) in a new process, its output silenced -> what it returns (or raises). The process
    is forked from a server that has imported module but nothing module imports late (transformers,
    torch._dynamo): fresh in all that is measured, without paying torch's import again each time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])  # (kept from the first call: the server starts then)
    with ProcessPoolExecutor(1, mp_context=context, initializer=silence) as pool:
        return pool.submit(getattr(importlib.import_module(module), fn), *fn_args).result()


def silence():
    """stdout and stderr to nowhere: a peer's progress bars and notes would land among the rows."""
    for fd in (1, 2):
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


# -----------------------------------------------------------------------------
# The machine's limits.


def matmul_peak(args, dtype):
    """FLOP/s of a large square matmul in dtype, the best any layer can hope for."""
    n = 4096 if args.device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    repeats = 8  # one call is too short to time steadily on a CPU that is still clocking up
    seconds = timed({"matmul": lambda: [a @ b for _ in range(repeats)]}, args,
                    f"{dtype} matmul")["matmul"] / repeats
    return 2 * n**3 / seconds


def read_bandwidth(args):
    """Bytes/s of summing 1 GiB of fp32: reading memory as batch-1 generation reads its weights."""
    big = torch.ones(2**28, device=args.device)
    repeats = 4
    seconds = timed({"sum": lambda: [big.sum() for _ in range(repeats)]}, args,
                    "memory bandwidth")["sum"] / repeats
    return big.numel() * 4 / seconds


def matvec_bandwidth(args):
    """Bytes/s of one token through a 1 GiB nn.Linear weight, tall (out > in) and wide (in > out), each
    stored (out, in) as nn.Linear makes it and (in, out): how fast the kernels batch-1 generation calls read
    each layout -> {"(out, in) shape": (out-in bytes/s, in-out bytes/s)}."""
    def speeds(out, inner):
        w, x = torch.randn(out, inner, device=args.device), torch.randn(1, inner, device=args.device)
        wt = w.t().contiguous()  # (in, out)
        t = timed({"out, in": lambda: F.linear(x, w), "in, out": lambda: x @ wt}, args, "matrix-vector")
        return tuple(w.numel() * 4 / t[k] for k in ("out, in", "in, out"))

    return {f"({out}, {inner})": speeds(out, inner) for out, inner in ((2**18, 2**10), (2**10, 2**18))}


def step_matmul_shapes(model):
    """The matrix products of a training step, one per nn.Linear: {(out, in): how many}. (wpe is looked
    up, not multiplied; the tied head is wte, multiplied once, as lm_head.)"""
    return Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_matmul_speedup(args, model, tokens):
    """How much faster bfloat16 computes the training step's own matrix products than float32, each weight
    (out, in) multiplied as the step does it: forward x W^T, backward g W and g^T x, over tokens rows (the
    attention's T x T products, a few per cent, left out). The ceiling of what autocast can gain: it also
    casts, and leaves the rest of the step in float32."""
    def products(dtype):  # every product of the step, the same operands for each weight of a shape
        work = []
        for (out, inner), count in step_matmul_shapes(model).items():
            x, w, g = (torch.randn(*shape, device=args.device, dtype=dtype)
                       for shape in ((tokens, inner), (out, inner), (tokens, out)))
            work += [(x, w, g)] * count
        return lambda: [(F.linear(x, w), g @ w, g.t() @ x) for x, w, g in work]

    t = timed({name: products(getattr(torch, name)) for name in ("float32", "bfloat16")}, args,
              "step matmuls")
    return t["float32"] / t["bfloat16"]
