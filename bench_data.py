"""Measure train.py's data path on a generated corpus: the speed and peak memory of
`train.py --prepare-only` against one tiktoken thread on the same text, and the peak memory of
training on that corpus, beside training on one copy of the text.

    python bench_data.py --text ../shared/data/tinyshakespeare.txt            # a 300 MB folder, deleted after
    python bench_data.py --text ../shared/data/tinyshakespeare.txt --mb 30 --repeat 1   # a quick look

The corpus is --text repeated into files of about --file-mb each, in a temporary folder. Each
repeat times one thread first, then the preparation, back to back. Where other work shares the
CPU the wall-clock ratio says little (Linux shares the CPU between sessions, not threads); the
tokens per CPU second and the cores used (CPU time / wall time) say what the threads cost and got.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from common import argument_parser, load_tokenizer, number, run

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
TARGET_TOKENS = 10e9  # the corpus size the figures are extrapolated to
# A small model and few steps: the memory that matters is the data's, beside torch's own.
TRAIN_ARGS = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--context-length", "128", "--batch-size", "8",
              "--max-iters", "3", "--eval-batches", "1", "--device", "cpu"]


def make_corpus(text_path, folder, mb, file_mb):
    """--text repeated into files of about file_mb MB, mb MB in all -> the folder."""
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    copies = max(1, round(file_mb * 1e6 / len(text.encode())))
    n_files = max(1, round(mb / file_mb))
    os.makedirs(folder)
    for i in range(n_files):
        with open(os.path.join(folder, f"part-{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(text * copies)
    return folder


def one_thread(folder, tokenizer):
    """tiktoken in this one thread, on each whole file of folder -> (tokens per second, per CPU second)."""
    tokens, t0, cpu0 = 0, time.time(), time.thread_time()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tokens += len(tokenizer.encode(f.read()))
    return tokens / (time.time() - t0), tokens / (time.thread_time() - cpu0)


def run_measured(cmd):
    """Run cmd -> (its stdout, wall seconds, CPU seconds, peak resident memory in MB)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return out, time.time() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def prepare(folder):
    """train.py --prepare-only on a folder not yet tokenized -> (tokens, tokens/s of the preparation,
    tokens per CPU second, cores used on average, peak MB); CPU figures include starting Python."""
    shutil.rmtree(folder + ".tokens", ignore_errors=True)
    out, wall, cpu, rss = run_measured([sys.executable, TRAIN, "--data", folder, "--prepare-only"])
    seconds = float(re.search(r"tokens in ([\d.]+) s", out).group(1))  # the preparation alone, without the start of python
    tokens = int(out.strip().splitlines()[-1].split()[0].replace(",", ""))
    return tokens, tokens / seconds, tokens / cpu, cpu / wall, rss


def train_rss(data, out_dir):
    """Peak MB of a few training steps on data."""
    return run_measured([sys.executable, TRAIN, "--data", data, "--out-dir", out_dir, "--overwrite", *TRAIN_ARGS])[3]


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--text", required=True, help="a UTF-8 text to repeat into the corpus")
    parser.add_argument("--mb", type=number(float, 1), default=300, help="size of the corpus")
    parser.add_argument("--file-mb", type=number(float, 0.1), default=10, help="size of each file of the corpus")
    parser.add_argument("--repeat", type=number(int, 1), default=2, help="measurements of each kind")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus is written (and deleted after)")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    work = tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp)
    try:
        folder = make_corpus(args.text, os.path.join(work, "corpus"), args.mb, args.file_mb)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        cores = os.cpu_count()
        print(f"corpus: {len(os.listdir(folder))} files, {size / 1e6:,.0f} MB of {os.path.basename(args.text)}; "
              f"{cores} cores; load average {os.getloadavg()[0]:.1f} at the start")
        ratios = []
        for r in range(args.repeat):
            single, single_cpu = one_thread(folder, tokenizer)
            tokens, speed, speed_cpu, cores_used, rss = prepare(folder)
            ratios.append(speed / single)
            print(f"run {r + 1}: one thread {single:,.0f} tokens/s; --prepare-only {speed:,.0f} tokens/s = {speed / single:.2f}x, "
                  f"peak RSS {rss:,.0f} MB ({tokens:,} tokens); per CPU second {single_cpu:,.0f} and {speed_cpu:,.0f} tokens, "
                  f"{cores_used:.2f} cores used; load average {os.getloadavg()[0]:.1f}")
        best = max(ratios)
        per_core = speed / cores
        print(f"10B tokens: {TARGET_TOKENS / speed / 3600:.1f} h here at the last run's speed; on 16 cores, if each "
              f"core keeps this run's {per_core:,.0f} tokens/s, {TARGET_TOKENS / (16 * per_core) / 3600:.1f} h; "
              f"{2 * TARGET_TOKENS / 1e9:.0f} GB of shards (best ratio {best:.2f}x)")
        small = os.path.join(work, "small.txt")
        shutil.copy(args.text, small)
        print(f"training ({' '.join(TRAIN_ARGS)}): peak RSS {train_rss(small, os.path.join(work, 'out')):,.0f} MB "
              f"on one copy ({os.path.getsize(small) / 1e6:.1f} MB), {train_rss(folder, os.path.join(work, 'out')):,.0f} MB "
              f"on the corpus ({size / 1e6:,.0f} MB, {tokens:,} tokens)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    run(main)
