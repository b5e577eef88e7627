"""Speed and memory of gpt2.py side by side with transformers' GPT-2, on the same random weights.

Both models live in one process and take turns (ours, theirs, theirs, ours, ...), so a
neighbour's load or a clock change hits both alike; every figure is a median after warm-up.
Memory is measured in fresh processes, so one row's leftovers never show in another's peak.
The machine's own limits are measured too: fp32 (bf16 on CUDA) matmul peak, and the memory
bandwidth that bounds batch-1 generation, where every weight is read once per new token.

    python bench.py                      # GPT-2 124M, the table in the README
    python bench.py --reps 5 --device cuda
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import argparse
import copy
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from cli import SEED, add_device_arg, argument_parser, number
from devices import DTYPES, keep_freed_memory, native_bf16, pick_device
from download_weights import TOKENIZER_FILES, write_hf
from errors import UserError, run
from files import save_atomic
import gpt2
from gpt2 import AMD_CPU, GPT, MODELS_DIR, GPTConfig
from int8 import quantize
from measure import (TRAINING, in_fresh_process, matmul_peak, matvec_bandwidth, memory_now_and_peak,
                     read_bandwidth, reset_peak, rss, step_matmul_speedup, timed)
from peers import generate, generate_ragged, installed, make_models, make_ours, start_engine
from trainer import configure_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1e6


# -----------------------------------------------------------------------------
# What is timed: the other layout, a training step, nanoGPT's generation loop.


def relaid(model, in_out):
    """model with every matrix contiguous (out, in), as nn.Linear makes them, or with (in, out) bytes
    (gpt2.load_weights's choice on an AMD CPU): the two layouts, measured on any CPU."""
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t() if in_out else p.data.contiguous()
    return model


QUICK = dict(n_layer=2, n_head=4, n_embd=64, batch_size=2, seq_len=16, prompt_len=8, new_tokens=12,
             batch_new_tokens=4, prefill=32, reps=1, warmup=0)  # --quick's sizes



def train_step(model, opt, data, autocast):
    """Forward, backward and an AdamW step on (B, T + 1) tokens: predict each next one."""
    with autocast:
        if isinstance(model, GPT):
            loss = model(data[:, :-1], data[:, 1:])[1]
        else:  # transformers shifts the labels itself
            loss = model(input_ids=data[:, :-1], labels=data[:, :-1]).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def generate_without_cache(model, idx, new_tokens, autocast):
    """nanoGPT's greedy loop: no KV cache, so every step runs the whole sequence again."""
    with autocast:
        for _ in range(new_tokens):
            x = model.hidden_states(idx[:, -model.config.n_ctx:])
            idx = torch.cat([idx, model.lm_head(x[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return idx


# -----------------------------------------------------------------------------
# Timing and memory.



def phase_peak(which, phase, args_dict):
    """Run in a fresh process: one phase (2 training steps, or a greedy generation) of one
    model -> (memory before, peak during) in bytes: RSS on CPU, allocated memory on CUDA."""
    args = argparse.Namespace(**args_dict)
    sizes = (args.n_layer, args.n_head, args.n_embd, args.seed)
    model = (make_ours(*sizes) if which == "ours" else make_models(*sizes)[1]).to(args.device)
    autocast = autocast_for(args.device)
    torch.manual_seed(args.seed)
    if phase == "train":
        model = relaid(model, False).train() if which == "ours" else model.train()  # as trainer.build_model
        opt = configure_optimizer(model, lr=1e-4, weight_decay=0.1)
        data = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1),
                             device=args.device)
        step = lambda: train_step(model, opt, data, autocast)  # noqa: E731
    else:
        idx = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=args.device)
        step = lambda: generate(model, idx, args.new_tokens, None, autocast)  # noqa: E731
    before = memory_now_and_peak(args.device)[0]
    reset_peak(args.device)
    # AdamW's state appears in the first step: peak in the second
    for _ in range(2 if phase == "train" else 1):
        step()
    return before, memory_now_and_peak(args.device)[1]


def load_peak(which, path):
    """Run in a fresh process: load path and read each weight once -> (seconds, RSS before, peak RSS) in
    bytes. which: "theirs" (transformers), "ours", or "ours, first" (torch._dynamo not imported yet: see
    GPT.empty)."""
    if which == "theirs":
        from transformers import GPT2LMHeadModel  # (its import also imports torch._dynamo)
    elif which == "ours":
        # what transformers' import brings; GPT.empty's first use needs it
        import torch._dynamo as dynamo  # noqa: F401
    elif "torch._dynamo" in sys.modules:
        raise RuntimeError("the fresh process for the first load had imported torch._dynamo already")
    before = rss()
    reset_peak("cpu")
    t0 = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(path) if which == "theirs" else GPT.from_pretrained(path)
    with torch.no_grad():
        sum(p.sum() for p in model.parameters())  # read every weight: both map the file lazily
    seconds = time.perf_counter() - t0
    if "tensorflow" in sys.modules:
        raise RuntimeError(f"loading {path} imported TensorFlow")
    return seconds, before, rss("VmHWM")


def autocast_for(device):
    """bf16 autocast on CUDA (its matmuls and flash attention are fast there); plain fp32 elsewhere."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


# -----------------------------------------------------------------------------
# The files that the loading rows read.


def checkpoints_root(args):
    """The temp folder the weights' files go to, kept for later runs of the same shape and seed."""
    shape = f"{args.n_layer}x{args.n_head}x{args.n_embd}"
    return os.path.join(tempfile.gettempdir(), f"gpt2-bench-{shape}-seed{args.seed}")


def tokenizer_folder():
    """A folder of download_weights.py's (models/<size>/) with GPT-2's tokenizer files, or None."""
    found = [os.path.dirname(p) for p in sorted(glob.glob(os.path.join(MODELS_DIR, "*", "encoder.json")))]
    return next((f for f in found if all(os.path.isfile(os.path.join(f, n)) for n in TOKENIZER_FILES)), None)


def checkpoints(ours, args):
    """The same weights as a Hugging Face folder (as download_weights.py converts OpenAI's checkpoint:
    transformers loads it too; with GPT-2's tokenizer files where tokenizer_folder finds them) and as a .pt
    of ours, written once into the temp folder and kept for later runs -> {"hf": folder, "pt": file}."""
    root, tokenizer = checkpoints_root(args), tokenizer_folder()
    paths = {"hf": os.path.join(root, "hf+tokenizer" if tokenizer else "hf"),
             "pt": os.path.join(root, "model.pt")}
    if not os.path.isdir(paths["hf"]):
        write_hf(ours, paths["hf"] + ".tmp", tokenizer)
        os.replace(paths["hf"] + ".tmp", paths["hf"])
    if not os.path.isfile(paths["pt"]):
        save_atomic(ours.checkpoint(), paths["pt"])
    return paths


# -----------------------------------------------------------------------------


def print_table(args, n_params, rows):
    print(f"GPT-2 {args.n_layer} layers x {args.n_embd} ({n_params / 1e6:.1f}M parameters), random weights, "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of "
          f"{args.reps} after {args.warmup} warm-up")
    print("\n| measurement | gpt2.py | peer: transformers, or the one named | gpt2.py / peer |\n"
          "| --- | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main():
    p = argument_parser(__doc__)
    p.add_argument("--n-layer", type=number(int, 1), default=12,
                   help="model size (the defaults are GPT-2 124M)")
    p.add_argument("--n-head", type=number(int, 1), default=12)
    p.add_argument("--n-embd", type=number(int, 1), default=768)
    p.add_argument("--batch-size", type=number(int, 1), default=4, help="training batch")
    p.add_argument("--seq-len", type=number(int, 1), default=256, help="training sequence length")
    p.add_argument("--prompt-len", type=number(int, 1), default=32, help="generation prompt, batch 1")
    p.add_argument("--new-tokens", type=number(int, 1), default=256, help="tokens generated per run")
    p.add_argument("--generation-only", action="store_true",
                   help="the machine's rows and batch-1 generation, nothing else (e.g. for the 355M shape: "
                   "--n-layer 24 --n-head 16 --n-embd 1024)")
    p.add_argument("--batch-new-tokens", type=number(int, 1), default=64,
                   help="tokens generated per row in the batch rows")
    p.add_argument("--top-k", type=number(int, 1), default=50, help="k of the top-k sampling row")
    p.add_argument("--prefill", type=number(int, 1), default=1024, help="prompt length of the prefill row")
    add_device_arg(p)
    p.add_argument("--reps", type=number(int, 1), default=3,
                   help="timed runs per row and model (the median is shown)")
    p.add_argument("--warmup", type=number(int, 0), default=1, help="untimed runs first")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights and tokens")
    p.add_argument("--quick", action="store_true",
                   help="every row on a 2-layer model of width 64, timed once: a look in under a minute, "
                   "not figures to compare")
    args = p.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    args.device = pick_device(args.device)
    if args.n_embd % args.n_head:
        raise UserError(f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    if max(args.seq_len + 1, args.prompt_len + args.new_tokens, args.prefill) > GPTConfig.n_ctx:
        raise UserError(f"sequences must fit GPT-2's context of {GPTConfig.n_ctx} tokens")
    dev, autocast = args.device, autocast_for(args.device)
    rows = []  # (what, ours, theirs, ratio ours/theirs or None)

    def row(what, ours, theirs="", ratio=None):
        rows.append((what, ours, theirs, "" if ratio is None else f"{ratio:.2f}x"))

    # The machine.
    peaks = {dtype: matmul_peak(args, DTYPES[dtype]) for dtype in ("float32", "bfloat16")
             if dtype == "float32" or native_bf16(dev)}
    bandwidth = read_bandwidth(args)
    matvec = matvec_bandwidth(args)
    ours, theirs = make_models(args.n_layer, args.n_head, args.n_embd, args.seed)
    files = None if args.generation_only else checkpoints(ours, args)  # before training changes the weights
    ours, theirs = ours.to(dev), theirs.to(dev)
    n_params = sum(p.numel() for p in ours.parameters())  # wte counted once: it is also lm_head
    # Each new token reads every weight but wpe (one row of it) once: the bound batch-1 generation can't beat.
    bytes_per_token = (n_params - ours.transformer.wpe.weight.numel()) * ours.lm_head.weight.element_size()
    bound = bandwidth / bytes_per_token
    for dtype, peak in peaks.items():
        row(f"{dtype} matmul peak ({dev}), GFLOP/s", f"{peak / 1e9:.0f}")
    row("memory read bandwidth, GB/s", f"{bandwidth / 1e9:.1f}")
    for shape, (out_in, in_out) in matvec.items():
        row(f"matrix-vector product, 1 GiB weight {shape}: stored (out, in) as nn.Linear's, GB/s",
            f"{out_in / 1e9:.1f}")
        row("matrix-vector product, the same weight stored (in, out), GB/s", f"{in_out / 1e9:.1f}")
    row(f"generation bound: bandwidth / {bytes_per_token / MB:.0f} MB of weights, tokens/s", f"{bound:.1f}")

    # Both must compute the same function, or the comparison means nothing.
    x = torch.randint(0, ours.config.vocab_size, (1, 64), device=dev)
    with torch.no_grad():
        diff = (ours(x)[0] - theirs(x).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the two models disagree (max logit difference {diff:.2g}): the weights did "
                           "not map over")

    # 1. Training: one step (forward, backward, AdamW) on the same batch and weights, as the training scripts
    # did it before (float32, torch's default foreach AdamW), with the fused AdamW, and in bfloat16 with it.
    c = ours.config
    if not args.generation_only:
        keep_freed_memory()  # as the training loop does, for both models
        data = torch.randint(0, c.vocab_size, (args.batch_size, args.seq_len + 1), device=dev)
        tokens = args.batch_size * args.seq_len
        # nanoGPT's count: 6 FLOPs per weight per token (forward 2, backward 4), plus attention's
        # T x T matmuls
        flops = (6 * (n_params - ours.transformer.wpe.weight.numel())
                 + 12 * c.n_layer * c.n_embd * args.seq_len)
        speed = {}
        for setting, (dtype, fused) in TRAINING.items():
            if dtype == "bfloat16" and not native_bf16(dev):
                row(f"training step, {setting}", "no native bfloat16 on this device")
                continue
            models = {"ours": relaid(copy.deepcopy(ours), False).train(),  # as trainer.build_model lays it
                      "theirs": copy.deepcopy(theirs).train()}
            opts = {k: configure_optimizer(m, lr=1e-4, weight_decay=0.1, fused=fused)
                    for k, m in models.items()}
            cast = torch.autocast(torch.device(dev).type, dtype=DTYPES[dtype], enabled=dtype != "float32")
            t = timed({k: (lambda k=k: train_step(models[k], opts[k], data, cast)) for k in models}, args,
                      setting)
            speed[setting] = {k: tokens / t[k] for k in t}
            a, b = speed[setting]["ours"], speed[setting]["theirs"]
            row(f"training step {args.batch_size} x {args.seq_len}, {setting}, tokens/s", f"{a:.1f}",
                f"{b:.1f}", a / b)
            peak = peaks[dtype]
            row(f"training, {setting}: GFLOP/s (share of the {dtype} matmul peak)", f"{a * flops / 1e9:.1f} "
                f"({a * flops / peak:.0%})", f"{b * flops / 1e9:.1f} ({b * flops / peak:.0%})", a / b)
            del models, opts
        first = speed[next(iter(TRAINING))]
        for setting in list(speed)[1:]:
            a, b = speed[setting]["ours"] / first["ours"], speed[setting]["theirs"] / first["theirs"]
            row(f"training, {setting} over {next(iter(TRAINING))}, speed-up", f"{a:.2f}x", f"{b:.2f}x")
        # bfloat16's ceiling here: the step's own matrix products alone, in bfloat16 over float32
        if native_bf16(dev):
            ceiling = step_matmul_speedup(args, ours, tokens)
            row("training, bfloat16 over float32: the step's own matrix products alone (the ceiling), "
                "speed-up", f"{ceiling:.2f}x")
            bf16, fp32 = (speed[f"{dtype}, fused AdamW"] for dtype in ("bfloat16 autocast", "float32"))
            a, b = bf16["ours"] / fp32["ours"], bf16["theirs"] / fp32["theirs"]
            row("training, bfloat16 autocast over float32, both fused AdamW: share of the ceiling",
                f"{a:.2f}x ({a / ceiling:.0%})", f"{b:.2f}x ({b / ceiling:.0%})", a / b)
        else:
            row("training, bfloat16 ceiling", "no native bfloat16 on this device")
        # the two layouts gpt2.load_weights chooses from, whichever this CPU loads
        models = {k: relaid(copy.deepcopy(ours), k == "in_out").train() for k in ("out_in", "in_out")}
        opts = {k: configure_optimizer(m, lr=1e-4, weight_decay=0.1) for k, m in models.items()}
        nocast = torch.autocast(torch.device(dev).type, enabled=False)
        t = timed({k: (lambda k=k: train_step(models[k], opts[k], data, nocast)) for k in models}, args,
                  "layouts")
        row("training, float32: every matrix (in, out) over (out, in), speed-up",
            f"{t['out_in'] / t['in_out']:.2f}x")
        del models, opts

    # 2. Generation, batch 1.
    idx = torch.randint(0, c.vocab_size, (1, args.prompt_len), device=dev)
    n = args.new_tokens
    greedy = timed({m: (lambda m=m: generate(m, idx, n, None, autocast)) for m in (ours, theirs)}, args,
                   "greedy")
    topk = timed({m: (lambda m=m: generate(m, idx, n, args.top_k, autocast)) for m in (ours, theirs)}, args,
                 "top-k")
    a, b = n / greedy[ours], n / greedy[theirs]
    row(f"generation, greedy, {args.prompt_len} + {n} tokens, tokens/s", f"{a:.1f}", f"{b:.1f}", a / b)
    row("generation, greedy, share of the bandwidth bound", f"{a / bound:.0%}", f"{b / bound:.0%}", a / b)
    # the two layouts gpt2.load_weights chooses from (ours is loaded in one of them)
    layouts = {k: relaid(copy.deepcopy(ours), k == "in_out") for k in ("out_in", "in_out")}
    t = timed({k: (lambda m=m: generate(m, idx, n, None, autocast)) for k, m in layouts.items()}, args,
              "layouts")
    loaded = "(in, out)" if AMD_CPU else "(out, in)"
    row(f"generation, greedy: every matrix (in, out) over (out, in), speed-up (ours loads {loaded})",
        f"{t['out_in'] / t['in_out']:.2f}x")
    del layouts

    def split(on):  # gpt2.Linear splits one row's product over the cores where gpt2.AMD_CPU says so
        gpt2.AMD_CPU = on
        return generate(ours, idx, n, None, autocast)

    t = timed({k: (lambda k=k: split(k == "split")) for k in ("mkl", "split")}, args, "split")
    gpt2.AMD_CPU = AMD_CPU
    where = "on this CPU" if AMD_CPU else "on AMD's CPUs, not this one"
    row(f"generation, greedy: one row's product split over the cores over MKL's own, speed-up (gpt2.Linear "
        f"splits it {where})", f"{t['mkl'] / t['split']:.2f}x")
    # C++ inference engines on the same weights, one at a time, float32 then int8 (ours in int8: int8.py, on
    # the CPU): CTranslate2 on transformers' copy, llama.cpp on our own GGUF export (q8_0: int8 in blocks).
    engines = [("CTranslate2", kind, kind == "int8") for kind in ("float32", "int8")
               if installed("ctranslate2")]
    engines += [("llama.cpp", kind, kind == "q8_0") for kind in ("f32", "q8_0")
                if installed("llama_cpp") and dev == "cpu"]
    for engine_name, kind, int8 in engines:
        engine = start_engine(engine_name, kind, ours, theirs, checkpoints_root(args))
        name = f"{engine_name} {kind}"
        if not int8 and not torch.equal(engine(idx, n), generate(ours, idx, n, None, autocast)):
            raise RuntimeError(f"{name} chose other greedy tokens: the weights did not map over")
        mine = quantize(ours) if int8 and dev == "cpu" else ours
        t = timed({"ours": lambda: generate(mine, idx, n, None, autocast),  # noqa: B023 (called here)
                   "engine": lambda: engine(idx, n)}, args, name)  # noqa: B023
        weights = "int8" if mine is not ours else "float32"
        row(f"generation, greedy, ours in {weights} weights, {name} as peer, tokens/s",
            f"{n / t['ours']:.1f}", f"{n / t['engine']:.1f}", t["engine"] / t["ours"])
        del engine, mine
    row(f"generation, top-k {args.top_k}, tokens/s", f"{n / topk[ours]:.1f}", f"{n / topk[theirs]:.1f}",
        topk[theirs] / topk[ours])
    if args.generation_only:
        return print_table(args, n_params, rows)
    slow = argparse.Namespace(**{**vars(args), "warmup": 0})  # warm already, and each run is long
    nocache = timed({ours: lambda: generate_without_cache(ours, idx, n, autocast)}, slow, "no KV cache")[ours]
    row("generation, greedy, no KV cache (nanoGPT's loop), tokens/s", f"{n / nocache:.1f}")
    row("KV cache speed-up, greedy", f"{nocache / greedy[ours]:.1f}x")

    # 2b. Batches: a step reads every weight once for all rows, so until the matmuls become the
    # limit, B rows cost little more than one.
    n = args.batch_new_tokens
    for B in (1, 4, 8, 16):
        batch = torch.randint(0, c.vocab_size, (B, args.prompt_len), device=dev)
        t = timed({m: (lambda m=m: generate(m, batch, n, None, autocast)) for m in (ours, theirs)}, args,
                  f"batch {B}")
        a, b = B * n / t[ours], B * n / t[theirs]
        row(f"generation, greedy, batch {B} x ({args.prompt_len} + {n}) tokens, tokens/s", f"{a:.1f}",
            f"{b:.1f}", a / b)
    lengths = [args.prompt_len * (i + 1) // 4 or 1 for i in range(8)]  # 8 to 64 for the default 32
    prompts = [torch.randint(0, c.vocab_size, (length,)).tolist() for length in lengths]
    fns = {m: (lambda m=m: generate_ragged(m, prompts, n, autocast)) for m in (ours, theirs)}
    fns["alone"] = lambda: [generate(ours, torch.tensor([p], device=dev), n, None, autocast) for p in prompts]
    t = timed(fns, args, "mixed lengths")
    a, b = 8 * n / t[ours], 8 * n / t[theirs]
    row(f"generation, greedy, 8 prompts of {lengths[0]} to {lengths[-1]} tokens in one batch, + {n} each, "
        "tokens/s", f"{a:.1f}", f"{b:.1f}", a / b)
    row("the same 8 prompts: one batch over one by one, speed-up", f"{t['alone'] / t[ours]:.1f}x")

    # 3. Prefill: the prompt goes through the model once, filling the KV cache, then one token comes out.
    long = torch.randint(0, c.vocab_size, (1, args.prefill), device=dev)
    t = timed({m: (lambda m=m: generate(m, long, 1, None, autocast)) for m in (ours, theirs)}, args,
              "prefill")
    row(f"prefill, {args.prefill} tokens, tokens/s", f"{args.prefill / t[ours]:.0f}",
        f"{args.prefill / t[theirs]:.0f}", t[theirs] / t[ours])

    # 4. Loading, each in a fresh process: both from the same Hugging Face folder (download_weights.py's
    # conversion), ours also from a .pt, and once without torch._dynamo imported before (GPT.empty's
    # first use).
    ours = theirs = None  # the loading rows measure fresh processes: free this one's memory
    weights = 4 * n_params  # float32
    runs = {"theirs": ("theirs", files["hf"]), "ours": ("ours", files["hf"]), "pt": ("ours", files["pt"]),
            "first": ("ours, first", files["hf"])}
    loads = {name: [] for name in runs}
    for i in tqdm(range(args.warmup + args.reps), desc="loading", leave=False):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            load = in_fresh_process("bench", "load_peak", *runs[name])
            if i >= args.warmup:  # the first fresh process of all ran 0.3 s slower than the next ones
                loads[name].append(load)
    (sa, ba, pa), (sb, bb, pb) = ([statistics.median(v) for v in zip(*loads[n])] for n in ("ours", "theirs"))
    row(f"loading {weights / MB:.0f} MB of weights from the same Hugging Face folder, s", f"{sa:.2f}",
        f"{sb:.2f}", sa / sb)
    row("loading, peak RSS over the process before loading, MB (x weights)", f"{(pa - ba) / MB:.0f} "
        f"({(pa - ba) / weights:.2f}x)", f"{(pb - bb) / MB:.0f} ({(pb - bb) / weights:.2f}x)",
        (pa - ba) / (pb - bb))
    row("loading, ours from a .pt of ours, s", f"{statistics.median(s for s, _, _ in loads['pt']):.2f}")
    row("loading, ours in a process that has not imported torch._dynamo yet, s",
        f"{statistics.median(s for s, _, _ in loads['first']):.2f}")

    # 5. Start-up, what a user waits for first: a whole `python sample.py --max-new-tokens 1` process against
    # the same work in transformers (tools/transformers_sample.py), from one folder with both tokenizers.
    label = "start-up: a whole python sample.py --max-new-tokens 1, against the same in transformers, s"
    if files["hf"].endswith("+tokenizer"):
        commands = {"ours": [sys.executable, "sample.py", "--model", files["hf"], "--max-new-tokens", "1"],
                    "theirs": [sys.executable, "-m", "tools.transformers_sample", "--model", files["hf"]]}
        t = timed({k: (lambda c=c: subprocess.run(c, cwd=HERE, check=True, capture_output=True))
                   for k, c in commands.items()}, args, "start-up")
        row(label, f"{t['ours']:.2f}", f"{t['theirs']:.2f}", t["ours"] / t["theirs"])
    else:
        row(label, f"needs GPT-2's tokenizer files: python download_weights.py (into {MODELS_DIR}/<size>/)")

    # 6. Peak memory of training and generation, each in a fresh process.
    kind = "allocated" if dev == "cuda" else "RSS"
    for phase, what in (("train", f"training step {args.batch_size} x {args.seq_len}"),
                        ("generate", "greedy generation")):
        grow = {}
        for which in tqdm(("ours", "theirs"), desc=f"{phase} memory", leave=False):
            before, peak_bytes = in_fresh_process("bench", "phase_peak", which, phase, vars(args))
            grow[which] = peak_bytes - before
        row(f"{what}, peak {kind} over the model's own, MB", f"{grow['ours'] / MB:.0f}",
            f"{grow['theirs'] / MB:.0f}", grow["ours"] / grow["theirs"])

    print_table(args, n_params, rows)

if __name__ == "__main__":
    run(main)
