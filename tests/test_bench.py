"""bench.py and the tools: they run on a tiny config and print every row (no timing is checked)."""

import math
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import measure
import peers
from devices import native_bf16
from files import save_atomic
from gpt2 import GPT, GPTConfig
from int8 import quantize
from tests.helpers import DATA, ROOT, TINY, hf_twin, run_script, tiny_model

BENCH_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--batch-size", "2", "--seq-len", "16",
              "--prompt-len", "8", "--new-tokens", "12", "--batch-new-tokens", "4", "--prefill", "32",
              "--reps", "1", "--warmup", "0"]
NATIVE_BF16 = native_bf16("cpu")  # bench.py measures bfloat16 where the CPU computes it
LLAMA_CPP = peers.installed("llama_cpp")  # and llama.cpp where llama-cpp-python is installed
LLAMA_FILES = ["llama-cpp-f32.gguf", "llama-cpp-q8_0.gguf"] if LLAMA_CPP else []
# the rows of each training setting: (start of the label, the columns shown: 1 ours, 3 compared)
TRAINING_ROWS = [
    row for setting in ("float32, torch's defaults (foreach AdamW)", "float32, fused AdamW",
                        "bfloat16 autocast, fused AdamW")
    for row in ([(f"training step 2 x 16, {setting}", 3), (f"training, {setting}", 3)]
                if NATIVE_BF16 or "bfloat16" not in setting else [("training step, bfloat16", 1)])]
# (start of the row's label, the columns shown: 1 ours only, 2 ours and theirs, 3 and their ratio)
BENCH_ROWS = [
    ("float32 matmul peak", 1), *([("bfloat16 matmul peak", 1)] if NATIVE_BF16 else []),
    ("memory read bandwidth", 1),
    *[row for shape in ("(262144, 1024)", "(1024, 262144)")
      for row in [(f"matrix-vector product, 1 GiB weight {shape}: stored (out, in)", 1),
                  ("matrix-vector product, the same weight stored (in, out)", 1)]],
    ("generation bound", 1), *TRAINING_ROWS,
    ("training, float32, fused AdamW over float32, torch's defaults (foreach AdamW), speed-up", 2),
    *([("training, bfloat16 autocast, fused AdamW over float32, torch's defaults (foreach AdamW), "
        "speed-up", 2)] if NATIVE_BF16 else []),
    *([("training, bfloat16 over float32: the step's own matrix products alone (the ceiling)", 1),
       ("training, bfloat16 autocast over float32, both fused AdamW: share of the ceiling", 3)]
      if NATIVE_BF16 else [("training, bfloat16 ceiling", 1)]),
    ("training, float32: every matrix (in, out) over (out, in)", 1),
    ("generation, greedy, 8 + 12 tokens", 3), ("generation, greedy, share of the bandwidth bound", 3),
    ("generation, greedy: every matrix (in, out) over (out, in)", 1),
    ("generation, greedy: one row's product split over the cores", 1),
    ("generation, greedy, ours in float32 weights, CTranslate2 float32 as peer", 3),
    ("generation, greedy, ours in int8 weights, CTranslate2 int8 as peer", 3),
    *([("generation, greedy, ours in float32 weights, llama.cpp f32 as peer", 3),
       ("generation, greedy, ours in int8 weights, llama.cpp q8_0 as peer", 3)] if LLAMA_CPP else []),
    ("generation, top-k 50", 3), ("generation, greedy, no KV cache", 1), ("KV cache speed-up", 1),
    ("generation, greedy, batch 1 x (8 + 4)", 3), ("generation, greedy, batch 4", 3),
    ("generation, greedy, batch 8", 3), ("generation, greedy, batch 16", 3),
    ("generation, greedy, 8 prompts of 2 to 16 tokens in one batch, + 4 each", 3), ("the same 8 prompts", 1),
    ("prefill, 32 tokens", 3),
    ("loading 14 MB of weights from the same Hugging Face folder", 3),
    ("loading, peak RSS over the process", 3), ("loading, ours from a .pt of ours", 1),
    ("loading, ours in a process that has not imported torch._dynamo", 1),
    ("start-up: a whole python sample.py --max-new-tokens 1, against the same in transformers", 3),
    ("training step 2 x 16, peak RSS", 3), ("greedy generation, peak RSS", 3),
]


def bench_run(args, tmp_path):
    return run_script("bench.py", *args, cwd=tmp_path, env={"TMPDIR": str(tmp_path)})


def test_bench_quick_prints_every_row_and_nothing_else(tmp_path):
    """--quick is the tiny configuration the other bench tests use; its output is the header line and the
    table, with no line of a peer's log among the rows."""
    assert bench.QUICK == {k.removeprefix("--").replace("-", "_"): int(v)
                           for k, v in zip(BENCH_TINY[::2], BENCH_TINY[1::2])}
    (tmp_path / "models" / "124M").mkdir(parents=True)  # download_weights.py's tokenizer files, for start-up
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / "models" / "124M" / name).symlink_to(DATA / "gpt2-124M" / name)
    out = bench_run(["--quick"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("GPT-2 2 layers x 64") and all(line.startswith("| ") for line in lines[1:])
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in r] for r in rows[2:]]  # after the header and its rule
    assert len(rows) == len(BENCH_ROWS), out.stdout
    number = re.compile(r"^\d+(\.\d+)?(x|%)?( \(\d+(\.\d+)?(x|%)\))?$")
    for (label, columns), (what, ours, theirs, ratio) in zip(BENCH_ROWS, rows):
        assert what.startswith(label), (label, what)
        assert number.match(ours) or ours == "no native bfloat16 on this device", (what, ours)
        assert bool(number.match(theirs)) == (columns >= 2) \
               and (theirs == "") == (columns < 2), (what, theirs)
        assert bool(re.match(r"^\d+\.\d\dx$", ratio)) == (columns == 3) \
               and (ratio == "") == (columns < 3), (what, ratio)
    # The Hugging Face folder and the .pt it wrote (and keeps in the temp folder) hold the very
    # weights it benchmarked.
    (folder,) = tmp_path.glob("gpt2-bench-2x4x64-seed0")
    ours, _ = peers.make_models(2, 4, 64, seed=0)
    assert {p.name for p in (folder / "hf+tokenizer").iterdir()} \
           == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    for kind in ("hf+tokenizer", "model.pt"):
        loaded = GPT.from_pretrained(str(folder / kind))
        for name, p in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), (kind, name)


def test_bench_generation_only_stops_after_batch_1(tmp_path, monkeypatch, run_main):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where bench.py keeps the weights' files
    out = run_main("bench.py", *BENCH_TINY, "--generation-only")
    assert out.returncode == 0, out.stderr[-3000:]
    labels = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")][2:]
    expected = [label for label, _ in BENCH_ROWS[:BENCH_ROWS.index(("generation, top-k 50", 3)) + 1]
                if "training" not in label]
    assert len(labels) == len(expected) and all(l.startswith(e) for l, e in zip(labels, expected)), labels
    # no checkpoints written for the loading rows: only the engines' converted weights
    assert sorted(p.name for p in tmp_path.glob("gpt2-bench-*/*")) == ["ctranslate2-float32", "ctranslate2-int8",
                                                                       *LLAMA_FILES]


def test_bench_models_compute_the_same():
    ours, theirs = peers.make_models(2, 4, 64, seed=1)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    no_autocast = bench.autocast_for("cpu")
    a = peers.generate(ours, x[:1], 10, None, no_autocast)
    assert torch.equal(a, peers.generate(theirs, x[:1], 10, None, no_autocast))
    assert torch.equal(a, bench.generate_without_cache(ours, x[:1], 10, no_autocast))
    assert peers.generate(theirs, x[:1], 10, 5, no_autocast).shape == (1, 30)  # top-k never stops early
    prompts = [x[0, :n].tolist() for n in (3, 20, 9)]
    assert peers.generate_ragged(ours, prompts, 8, no_autocast) \
           == peers.generate_ragged(theirs, prompts, 8, no_autocast)


def test_the_ceiling_times_every_matrix_product_of_a_training_step(monkeypatch):
    """bfloat16's ceiling multiplies what a step multiplies: GPT-2 124M's four matrices a block and the
    head, each forward and twice backward, in both formats: torch's own count of a real step's
    matrix-times-matrix FLOPs (attention's T x T products aside), and nanoGPT's 6 per weight per token."""
    assert measure.step_matmul_shapes(GPT.empty(GPTConfig())) == {
        (2304, 768): 12, (768, 768): 12, (3072, 768): 12, (768, 3072): 12, (50257, 768): 1}
    model, tokens = tiny_model(), 2 * 16
    flops = {}

    def counted(fns, args, desc):  # measure.timed's place: each run once, its FLOPs counted
        for name, fn in fns.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
        return {name: 1.0 for name in fns}

    monkeypatch.setattr(measure, "timed", counted)
    assert measure.step_matmul_speedup(SimpleNamespace(device="cpu"), model, tokens) == 1.0
    with FlopCounterMode(display=False) as step:
        model(torch.randint(0, model.config.vocab_size, (2, 16)))[0].sum().backward()
    aten = torch.ops.aten
    linear = sum(n for op, n in step.get_flop_counts()["Global"].items() if op in (aten.mm, aten.addmm))
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops["float32"] == flops["bfloat16"] == linear == 6 * tokens * matrices


def test_ctranslate2_peer_generates_our_greedy_tokens(tmp_path):
    """CTranslate2 on transformers' copy of our weights, converted without tokenizer files: the same
    greedy tokens in float32; in int8 (one scale per row) its logits are near enough to start alike."""
    ours, theirs = peers.make_models(2, 4, 64, seed=2)
    idx = torch.randint(0, 50257, (1, 12))
    expected = peers.generate(ours, idx, 10, None, bench.autocast_for("cpu"))
    engine = peers.ctranslate2_generator(theirs, str(tmp_path / "f32"), "float32")
    assert torch.equal(peers.generate_ctranslate2(engine, idx, 10), expected)
    int8 = peers.generate_ctranslate2(peers.ctranslate2_generator(theirs, str(tmp_path / "i8"), "int8"), idx, 10)
    assert int8.shape == expected.shape and torch.equal(int8[:, :13], expected[:, :13])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32", "i8"]  # written whole, renamed into place


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG's bindings are glibc's")
def test_ctranslate2_keeps_its_own_openmp():
    """Bound plainly, CTranslate2's OpenMP calls land in torch's runtime (loaded first, global) and slow
    both engines; peers binds it deep: glibc's loader, asked to report, shows its calls going to its own."""
    script = "import torch, peers; peers.import_ctranslate2()"
    loader = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LD_DEBUG": "bindings"},
                            capture_output=True, text=True, cwd=ROOT, check=True).stderr
    binding = r"binding file \S*libctranslate2\S* \[0\] to (\S+) \[0\]: normal symbol `GOMP_parallel'"
    targets = re.findall(binding, loader)
    assert targets and all("ctranslate2" in t and "torch" not in t for t in targets), targets


def test_bench_int8_perplexity_and_rows(tmp_path, run_main):
    from tools import bench_int8

    model = tiny_model(n_ctx=16)
    # windows of 17, 17 and 8 tokens, sharing their ends
    ids = torch.randint(0, TINY["vocab_size"], (40,)).tolist()
    hf = hf_twin(model)
    with torch.no_grad():  # each window: 16 (or fewer) inputs, each predicting the token after it
        nll = sum(F.cross_entropy(hf(torch.tensor([ids[i:i + 16]])).logits[0, :len(ids[i + 1:i + 17])],
                                  torch.tensor(ids[i + 1:i + 17]), reduction="sum").item()
                  for i in (0, 16, 32))
    assert bench_int8.perplexity(model, ids) == pytest.approx(math.exp(nll / 39), rel=1e-5)
    q = quantize(model)
    # close, not equal
    assert bench_int8.perplexity(q, ids) == pytest.approx(bench_int8.perplexity(model, ids), rel=0.05)
    assert bench_int8.perplexity(q, ids) != bench_int8.perplexity(model, ids)
    path = str(tmp_path / "tiny.pt")
    save_atomic(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=32)).checkpoint(), path)
    (tmp_path / "held.txt").write_text((DATA / "the-verdict.txt").read_text(encoding="utf-8")[:2000],
                                       encoding="utf-8")
    r = run_main("tools/bench_int8.py", "--model", path, "--text", tmp_path / "held.txt", "--n-layer", 1,
                 "--n-head", 2, "--n-embd", 32, "--new-tokens", 3, "--reps", 1)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].split(" ")[1] for row in rows] == ["perplexity", "greedy"]
    assert all(re.search(r"\| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|$", row) for row in rows), rows


def test_bench_rejects_bad_size(tmp_path):
    out = bench_run(["--n-embd", "65", "--n-head", "4"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "error: --n-embd 65 is not a multiple of --n-head 4"


