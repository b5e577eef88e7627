"""Learned positions (GPT-2's) against rotary ones (RoPE), trained alike on Tiny Shakespeare.

    # from the project's folder
    python -m tools.compare_positions --data /path/to/tinyshakespeare.txt
    python -m tools.compare_positions --steps 600 --seeds 0 1 2 3 4

Both kinds get the same model, the same initial weights wherever they share them (everything but the
learned table wpe), the same batches in the same order and the same optimizer and schedule: only
GPTConfig.positions differs. They train on windows of C = --context tokens in a model with n_ctx = 4C,
so the learned table has a row for every position of the longer evaluation windows (2C and 4C), but
the rows past C are never trained. The text is tokenized with GPT-2's BPE and its ids renumbered to
the ones it uses (11,706 for Tiny Shakespeare instead of 50,257: the output layer would otherwise be
most of each step); its first 90% is for training, the rest held out.

Written into --out-dir: positions.png (validation loss over the run, mean over seeds; loss by
position on the 4C windows), results.md (the tables) and results.json (every number).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # gpt2.py, run as a file too
from gpt2 import GPT, GPTConfig, Tokenizer  # noqa: E402

DATA = "data/tinyshakespeare.txt"
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
OUT_DIR = "out/positions"
KINDS = ("learned", "rope")
N_LAYER, N_HEAD, N_EMBD = 4, 4, 256
CONTEXT = 128  # C: the training windows; n_ctx = 4C
STEPS = 240
BATCH_SIZE = 4
LR = 1e-3  # AdamW, linear warm-up over the first 10% of the steps, then cosine decay to a tenth
WEIGHT_DECAY = 0.1  # on the matrices (embeddings included), not on biases and layer norms
GRAD_CLIP = 1.0
EVAL_INTERVAL = 20
VAL_WINDOWS = 16  # held-out windows of C for the validation curve, the same at every evaluation
LONG_WINDOWS = 48  # windows of 2C and of 4C in each bucket of the loss by position
SEEDS = (0, 1, 2)
VAL_FRACTION = 0.1
THREADS = 1  # steady on shared cores: here 2 threads ran 8x slower whenever anything else ran


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA, help="a UTF-8 text file (Tiny Shakespeare's input.txt)")
    p.add_argument("--out-dir", default=OUT_DIR, help="where positions.png, results.md and results.json go")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="one run of each kind per seed")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps of each run")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="windows per step")
    p.add_argument("--context", type=int, default=CONTEXT, help="C, the training window; n_ctx = 4C")
    p.add_argument("--n-layer", type=int, default=N_LAYER)
    p.add_argument("--n-head", type=int, default=N_HEAD)
    p.add_argument("--n-embd", type=int, default=N_EMBD)
    p.add_argument("--lr", type=float, default=LR, help="AdamW's peak learning rate")
    p.add_argument("--eval-interval", type=int, default=EVAL_INTERVAL, help="steps between evaluations")
    p.add_argument("--val-windows", type=int, default=VAL_WINDOWS, help="held-out windows of C")
    p.add_argument("--long-windows", type=int, default=LONG_WINDOWS,
                   help="held-out windows of 2C and of 4C in each bucket of C/2 positions")
    p.add_argument("--threads", type=int, default=THREADS, help="torch's threads (0: one per core)")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.context, args.eval_interval, args.val_windows,
           args.long_windows) < 1 or args.context % 2:
        p.error("the sizes must be positive, and --context even (the position buckets are C/2 wide)")
    return args


def load_ids(path):
    """The text as GPT-2 BPE ids renumbered 0..V-1 in the order of GPT-2's ids -> ((N,) ids, V)."""
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found: download Tiny Shakespeare from {DATA_URL} there, or pass --data")
    with open(path, encoding="utf-8") as f:
        ids = Tokenizer().encode(f.read())
    used = sorted(set(ids))
    renumber = {t: i for i, t in enumerate(used)}
    return torch.tensor([renumber[t] for t in ids]), len(used)


def windows(ids, length, count, stride=None):
    """count windows of length + 1 tokens (inputs and their next tokens) of ids: evenly spread over them, or
    stride tokens apart from the first."""
    last = len(ids) - length - 1 if stride is None else (count - 1) * stride
    if len(ids) < last + length + 1:
        sys.exit(f"error: the held-out text has {len(ids)} tokens, fewer than {count} windows of {length + 1}"
                 + (f" {stride} apart" if stride else ""))
    starts = torch.linspace(0, last, count).long()
    return torch.stack([ids[s:s + length + 1] for s in starts])  # (count, length + 1)


@torch.no_grad()
def token_losses(model, wins, chunk=8):
    """The cross-entropy of predicting each next token of the windows (n, L + 1) -> (n, L)."""
    model.eval()
    losses = []
    for w in wins.split(chunk):
        logits, _ = model(w[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none"))
    return torch.cat(losses)


def loss_by_position(model, wins, width):
    """The mean loss in each of the n buckets of width positions of windows (count + n - 1, n * width + 1)
    that start width tokens apart, every bucket over the very same count * width tokens: window i's bucket b
    holds the tokens of segment i + b, and bucket b averages the count windows that put segments n - 1 ...
    n + count - 2 there. From bucket to bucket only the position differs (and how much text precedes it)."""
    n = (wins.size(1) - 1) // width
    count = len(wins) - n + 1
    losses = token_losses(model, wins)
    by_bucket = losses.view(len(losses), n, width).mean(2)  # (windows, n)
    return [by_bucket[n - 1 - b:n - 1 - b + count, b].mean().item() for b in range(n)]


def optimizer(model, args):
    """AdamW, decay on the matrices only; warm-up then cosine decay to a tenth of the peak."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)

    def scale(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, scale)


def eval_steps(steps, interval):
    """Every interval steps, the end, and the thirds of the run (the table's three points)."""
    return sorted({*range(0, steps, interval), steps // 3, 2 * steps // 3, steps})


def train(model, train_ids, order, val, args):
    """Train model on the windows of train_ids starting at order (steps, batch) -> (validation curve
    [(step, loss)], training tokens/s)."""
    opt, schedule = optimizer(model, args)
    C, curve, seconds, evals = args.context, [], 0.0, set(eval_steps(args.steps, args.eval_interval))
    offsets = torch.arange(C + 1)
    for step in range(args.steps + 1):
        if step in evals:
            curve.append((step, token_losses(model, val).mean().item()))
        if step == args.steps:
            break
        model.train()
        t0 = time.perf_counter()
        batch = train_ids[order[step][:, None] + offsets]  # (B, C + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        schedule.step()
        seconds += time.perf_counter() - t0
    return curve, args.steps * args.batch_size * C / seconds


def models(seed, vocab_size, args):
    """One model of each kind, with the same initial weights wherever they share them."""
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, n_ctx=4 * args.context, n_layer=args.n_layer, n_head=args.n_head,
                  n_embd=args.n_embd)
    learned, rope = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, positions="rope"))
    shared = {k: v for k, v in learned.state_dict().items() if k in rope.state_dict()}
    rope.load_state_dict(shared)  # strict: everything the rope model has
    return {"learned": learned, "rope": rope}


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(args):
    """Every run of every kind -> the results dict that results.json holds."""
    ids, vocab_size = load_ids(args.data)
    split = int(len(ids) * (1 - VAL_FRACTION))
    train_ids, held = ids[:split], ids[split:]
    C = args.context
    val = windows(held, C, args.val_windows)
    # for the loss by position: 2n buckets of C/2 in windows of nC, each bucket over long_windows windows
    long = {n: windows(held, n * C, args.long_windows + 2 * n - 1, stride=C // 2) for n in (2, 4)}
    if len(train_ids) < C + 2:
        sys.exit(f"error: the training text has {len(train_ids)} tokens, fewer than a window of {C + 1}")
    runs = {kind: [] for kind in KINDS}
    for i, seed in enumerate(args.seeds):
        g = torch.Generator().manual_seed(seed)
        order = torch.randint(0, len(train_ids) - C, (args.steps, args.batch_size), generator=g)  # both kinds
        pair = list(models(seed, vocab_size, args).items())
        for kind, model in pair[::-1] if i % 2 else pair:  # each kind first in turn: the same load on both
            t0 = time.perf_counter()
            curve, tokens_per_s = train(model, train_ids, order, val, args)
            by_position = {f"{n}C": loss_by_position(model, w, C // 2) for n, w in long.items()}
            runs[kind].append({"seed": seed, "curve": curve, "tokens_per_s": tokens_per_s,
                               "buckets": by_position, "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {kind:7}: validation loss {curve[-1][1]:.3f} after {args.steps} steps, "
                  f"{tokens_per_s:,.0f} tokens/s, 4C buckets "
                  + " ".join(f"{b:.2f}" for b in by_position["4C"]), flush=True)
    return {"settings": {**vars(args), "vocab_size": vocab_size, "n_ctx": 4 * C, "bucket_width": C // 2,
                         "train_tokens": len(train_ids), "held_out_tokens": len(held)},
            "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "runs": runs, "summary": summary(runs, args)}


def summary(runs, args):
    """Means and standard deviations over the seeds: the curve, the three points, tokens/s, the buckets."""
    out = {}
    for kind, rs in runs.items():
        steps = [s for s, _ in rs[0]["curve"]]
        curve = [mean_std([r["curve"][i][1] for r in rs]) for i in range(len(steps))]
        points = {s: curve[steps.index(s)] for s in (args.steps // 3, 2 * args.steps // 3, args.steps)}
        out[kind] = {"steps": steps, "curve": curve, "points": points,
                     "tokens_per_s": mean_std([r["tokens_per_s"] for r in rs]),
                     "buckets": {n: [mean_std(v) for v in zip(*(r["buckets"][n] for r in rs))]
                                 for n in rs[0]["buckets"]}}
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(results):
    """results.md: the validation loss at three points, tokens/s, and the loss by position bucket."""
    s, summ = results["settings"], results["summary"]
    pm = "{:.3f} ± {:.3f}".format
    lines = [f"Validation loss on held-out windows of C = {s['context']} tokens, mean ± std over "
             f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}):", "",
             "| | " + " | ".join(KINDS) + " |", "| --- |" + " --- |" * len(KINDS)]
    for step, name in zip(summ[KINDS[0]]["points"], ("1/3", "2/3", "end")):
        cells = " | ".join(pm(*summ[k]["points"][step]) for k in KINDS)
        lines.append(f"| step {step} ({name}) | {cells} |")
    lines.append("| training tokens/s | " + " | ".join("{:,.0f} ± {:,.0f}".format(*summ[k]["tokens_per_s"])
                                                    for k in KINDS) + " |")
    w = s["bucket_width"]
    for n in summ[KINDS[0]]["buckets"]:
        lines += ["", f"Loss by position on held-out windows of {n} = {int(n[0]) * s['context']} tokens "
                  f"(trained on windows of C = {s['context']}), buckets of {w} positions:", "",
                  "| positions | " + " | ".join(KINDS) + " |", "| --- |" + " --- |" * len(KINDS)]
        for i in range(len(summ[KINDS[0]]["buckets"][n])):
            past = " (past C)" if i * w >= s["context"] else ""
            lines.append(f"| {i * w}–{(i + 1) * w - 1}{past} | "
                         + " | ".join(pm(*summ[k]["buckets"][n][i]) for k in KINDS) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Two panels: validation loss over the run; loss by position on the 4C windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, summ = results["settings"], results["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in KINDS:
        mean, std = (torch.tensor(v) for v in zip(*summ[kind]["curve"]))
        line, = left.plot(summ[kind]["steps"], mean, label=kind)
        left.fill_between(summ[kind]["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
        mean, std = (torch.tensor(v) for v in zip(*summ[kind]["buckets"]["4C"]))
        centres = [(i + 0.5) * s["bucket_width"] for i in range(len(mean))]
        right.errorbar(centres, mean, yerr=std, marker="o", capsize=3, label=kind)
    if len(summ[KINDS[0]]["steps"]) > 2:  # the first drop off the top, the differences after it in view
        left.set_ylim(top=max(summ[k]["curve"][1][0] for k in KINDS) + 0.1)
    left.set(xlabel="step", ylabel="validation loss", title=f"Windows of C = {s['context']}, "
             f"mean ± std of {len(s['seeds'])} seeds")
    right.axvline(s["context"], color="gray", linestyle="--", linewidth=1)
    right.text(s["context"], right.get_ylim()[1], " trained up to here", va="top", fontsize=8, color="gray")
    right.set(xlabel="position in the window", ylabel="loss", title=f"Windows of 4C = {4 * s['context']}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    results = run(args)
    results["wall_seconds"] = time.perf_counter() - t0
    text = table(results)
    with open(os.path.join(args.out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out_dir, "positions.png"))
    print(text + f"\nwall time {results['wall_seconds']:.0f} s; written to {args.out_dir}/"
          "{positions.png,results.md,results.json}")


if __name__ == "__main__":
    main()
