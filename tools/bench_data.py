"""Measure train.py's data path on a generated corpus: the speed and memory of
`train.py --prepare-only` against one tiktoken thread on the same text and against the machine's
ceiling, and the peak memory of training on that corpus, beside training on one copy of the text.

    python -m tools.bench_data --text tinyshakespeare.txt        # a 300 MB folder, deleted after
    python -m tools.bench_data --text tinyshakespeare.txt --mb 96 --file-mb 3 \\
        --workers 1 2 4 8 16                                     # 16 cores

The corpus is --text repeated into files of about --file-mb each, in a temporary folder. Each
repeat measures, back to back: one tiktoken thread on the whole files; the ceiling, as many
independent one-thread processes as the largest --workers, each on its share of the files, all at
once (no preparation with that many workers can beat it: it is what the cores do with nothing
shared); and `--prepare-only` with each --workers. Where other work shares the CPU the wall-clock ratios say
little; the cores used (CPU time / wall time) say how much of the machine a run got.
"""

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from cli import argument_parser, number
from errors import run
from loading import load_tokenizer

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
TARGET_TOKENS = 10e9  # the corpus size the figures are extrapolated to
# A small model and few steps: the memory that matters is the data's, beside torch's own.
TRAIN_ARGS = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--context-length", "128",
              "--batch-size", "8", "--max-iters", "3", "--eval-batches", "1", "--device", "cpu"]


def make_corpus(text_path, folder, mb, file_mb):
    """--text repeated into files of about file_mb MB, mb MB in all -> their paths."""
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    copies = max(1, round(file_mb * 1e6 / len(text.encode())))
    os.makedirs(folder)
    paths = [os.path.join(folder, f"part-{i:04d}.txt") for i in range(max(1, round(mb / file_mb)))]
    for path in paths:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text * copies)
    return paths


def encode_files(paths, tokenizer):
    """tiktoken in this one thread, on each whole file -> (tokens, wall seconds, CPU seconds)."""
    tokens, t0, cpu0 = 0, time.time(), time.thread_time()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tokens += len(tokenizer.encode(f.read()))
    return tokens, time.time() - t0, time.thread_time() - cpu0


def ceiling(paths, tokenizer, n):
    """n processes at once, each one tiktoken thread on every n-th file -> (tokens/s, cores used)."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=lambda i=i: results.put(encode_files(paths[i::n], tokenizer)))
             for i in range(n)]
    t0 = time.time()
    for p in procs:
        p.start()
    done = [results.get() for _ in procs]
    wall = time.time() - t0
    for p in procs:
        p.join()
    return sum(d[0] for d in done) / wall, sum(d[2] for d in done) / wall


def tree_pss_mb(pid):
    """Memory of a process and all its descendants: the sum of their proportional set sizes (PSS,
    a page shared by k processes counts 1/k in each), in MB; 0 once it is gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, AttributeError):  # it ended meanwhile
            pass
    return total / 1e6


def run_measured(cmd):
    """Run cmd -> (its stdout, wall seconds, CPU seconds of it and its children, peak RSS of its largest
    process in MB, peak of the sum of its processes' PSS in MB, sampled every 0.05 s)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_pss_mb(p.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = p.stdout.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(p.pid, 0)  # its own rusage and that of the children it waited for
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    # ru_maxrss: KiB
    return out, time.time() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak[0]


def prepare(folder, workers):
    """train.py --prepare-only on a folder not yet tokenized -> (tokens, tokens/s of the preparation,
    cores used on average, peak RSS of one process, peak PSS of all); CPU figures include starting Python."""
    shutil.rmtree(folder + ".tokens", ignore_errors=True)
    out, wall, cpu, rss, pss = run_measured([sys.executable, TRAIN, "--data", folder, "--prepare-only",
                                             "--workers", str(workers)])
    # the preparation alone, without the start of python
    seconds = float(re.search(r"tokens in ([\d.]+) s", out).group(1))
    tokens = int(out.strip().splitlines()[-1].split()[0].replace(",", ""))
    return tokens, tokens / seconds, cpu / wall, rss, pss


def train_memory(data, out_dir):
    """Peak RSS and PSS (MB) of a few training steps on data."""
    return run_measured([sys.executable, TRAIN, "--data", data, "--out-dir", out_dir,
                         "--overwrite", *TRAIN_ARGS])[3:]


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--text", required=True, help="a UTF-8 text to repeat into the corpus")
    parser.add_argument("--mb", type=number(float, 1), default=300, help="size of the corpus")
    parser.add_argument("--file-mb", type=number(float, 0.1), default=10,
                        help="size of each file of the corpus")
    parser.add_argument("--workers", type=number(int, 1), nargs="+", default=[len(os.sched_getaffinity(0))],
                        help="train.py --workers to measure, one preparation each")
    parser.add_argument("--repeat", type=number(int, 1), default=2, help="measurements of each kind")
    parser.add_argument("--tmp", default=tempfile.gettempdir(),
                        help="where the corpus is written (and deleted after)")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    cores, n = len(os.sched_getaffinity(0)), max(args.workers)
    work = tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp)
    try:
        folder = os.path.join(work, "corpus")
        paths = make_corpus(args.text, folder, args.mb, args.file_mb)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"corpus: {len(paths)} files, {size / 1e6:,.0f} MB of {os.path.basename(args.text)}; {cores} "
              f"cores; load average {os.getloadavg()[0]:.1f} at the start")
        best = {}
        for r in range(args.repeat):
            tokens, wall, cpu = encode_files(paths, tokenizer)
            single = tokens / wall
            top, top_cores = ceiling(paths, tokenizer, n)
            print(f"run {r + 1}: one thread {single:,.0f} tokens/s ({tokens:,} tokens); ceiling ({n} "
                  f"one-thread processes at once) {top:,.0f} tokens/s = {top / single:.2f}x, "
                  f"{top_cores:.2f} cores used")
            for w in args.workers:
                _, speed, used, rss, pss = prepare(folder, w)
                best[w] = max(best.get(w, 0), speed)
                print(f"  --prepare-only --workers {w}: {speed:,.0f} tokens/s = {speed / single:.2f}x one "
                      f"thread, {speed / top:.2f} of the ceiling; {used:.2f} cores used; peak RSS {rss:,.0f} "
                      f"MB (largest process), {pss:,.0f} MB (all processes, PSS); load average "
                      f"{os.getloadavg()[0]:.1f}")
        for w, speed in best.items():
            print(f"10B tokens with --workers {w}: {TARGET_TOKENS / speed / 3600:.2f} h at the best run's "
                  f"{speed:,.0f} tokens/s")
        print(f"{2 * TARGET_TOKENS / 1e9:.0f} GB of shards for 10B tokens")
        small = os.path.join(work, "small.txt")
        shutil.copy(args.text, small)
        for name, data in ((f"one copy ({os.path.getsize(small) / 1e6:.1f} MB)", small),
                           (f"the corpus ({size / 1e6:,.0f} MB, {tokens:,} tokens)", folder)):
            rss, pss = train_memory(data, os.path.join(work, "out"))
            print(f"training ({' '.join(TRAIN_ARGS)}) on {name}: peak RSS {rss:,.0f} MB, PSS {pss:,.0f} MB")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    run(main)
