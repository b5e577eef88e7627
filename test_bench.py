"""bench.py: it runs on a tiny config and prints every row; the two models it compares are the
same function; the checkpoint it writes has the layout of OpenAI's release. No timing is checked."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import bench
from gpt2 import GPT, GPTConfig

BENCH_HERE = Path(__file__).resolve().parent
BENCH_DATA = BENCH_HERE.parent / "shared" / "data"
BENCH_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--batch-size", "2", "--seq-len", "16",
              "--prompt-len", "8", "--new-tokens", "12", "--prefill", "32", "--reps", "1", "--warmup", "0"]
BENCH_ROWS = [  # (start of the row's label, whether transformers' figure and the ratio are shown)
    ("float32 matmul peak", False), ("memory read bandwidth", False), ("generation bound", False),
    ("training step", True), ("training, GFLOP/s", True),
    ("generation, greedy, 8 + 12 tokens", True), ("generation, greedy, share of the bandwidth bound", True),
    ("generation, top-k 50", True), ("generation, greedy, no KV cache", False), ("KV cache speed-up", False),
    ("prefill, 32 tokens", True),
    ("loading", True), ("loading, peak RSS of the whole process", True), ("loading, peak RSS over the process", True),
    ("training step 2 x 16, peak RSS", True), ("greedy generation, peak RSS", True),
]


def bench_run(args, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "TIKTOKEN_CACHE_DIR": str(BENCH_DATA / "tiktoken-cache")}
    return subprocess.run([sys.executable, str(BENCH_HERE / "bench.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_prints_every_row(tmp_path):
    out = bench_run(BENCH_TINY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in r] for r in rows[2:]]  # after the header and its rule
    assert len(rows) == len(BENCH_ROWS), out.stdout
    number = re.compile(r"^\d+(\.\d+)?(x|%)?( \(\d+(\.\d+)?(x|%)\))?$")
    for (label, compared), (what, ours, theirs, ratio) in zip(BENCH_ROWS, rows):
        assert what.startswith(label), (label, what)
        assert number.match(ours), (what, ours)
        if compared:
            assert number.match(theirs) and re.match(r"^\d+\.\d\dx$", ratio), (what, theirs, ratio)
        else:
            assert theirs == ratio == "", (what, theirs, ratio)
    # The OpenAI checkpoint it wrote (and keeps in the temp folder) holds the very weights it benchmarked.
    (folder,) = tmp_path.glob("gpt2-bench-2x4x64-seed0")
    ours, _ = bench.make_models(2, 4, 64, seed=0)
    loaded = GPT.from_pretrained(str(folder / "openai"))
    for name, p in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_bench_models_compute_the_same():
    ours, theirs = bench.make_models(2, 4, 64, seed=1)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    no_autocast = bench.autocast_for("cpu")
    a = bench.generate(ours, x[:1], 10, None, no_autocast)
    assert torch.equal(a, bench.generate(theirs, x[:1], 10, None, no_autocast))
    assert torch.equal(a, bench.generate_without_cache(ours, x[:1], 10, no_autocast))
    assert bench.generate(theirs, x[:1], 10, 5, no_autocast).shape == (1, 30)  # top-k never stops early


def test_bench_checkpoint_has_openai_layout():
    import tensorflow as tf

    release = dict(tf.train.list_variables(str(BENCH_DATA / "gpt2-124M" / "model.ckpt")))
    ours = {name: list(a.shape) for name, a in bench.openai_arrays(GPT(GPTConfig()))}
    assert ours == release


def test_bench_rejects_bad_size(tmp_path):
    out = bench_run(["--n-embd", "65", "--n-head", "4"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "error: --n-embd 65 is not a multiple of --n-head 4"
