"""Is int8 worth it on a CPU? gpt2.py's model in fp32 against the same model with int8 weights.

    # from the project's folder
    python -m tools.bench_int8 --model out-shakespeare/best.pt --text heldout.txt

The int8 model is int8.py's (`python sample.py --int8`): every matrix, the output head included, stored
as int8 with one scale per output row, the activations quantized on the fly. Two figures, each side by side
in one process:

- speed: greedy generation on random weights of the --n-layer/--n-head/--n-embd shape (124M by
  default), the two models taking turns, median of --reps runs after a warm-up;
- quality: the perplexity of --model (a checkpoint written by train.py) on --text, a text it
  was not trained on, read in windows of its context length.
"""

import math
import statistics
import time

import torch

from cli import argument_parser, number
from errors import run
from gpt2 import GPT, GPTConfig
from int8 import quantize
from loading import load_model, load_tokenizer


@torch.no_grad()
def perplexity(model, ids):
    """exp(mean cross-entropy) of predicting each next token of ids, in windows of n_ctx + 1 tokens."""
    n, losses = model.config.n_ctx, []
    for i in range(0, len(ids) - 1, n):
        window = torch.tensor(ids[i:i + n + 1])
        if len(window) < 2:
            break
        losses.append(model(window[None, :-1], window[None, 1:])[1].item() * (len(window) - 1))
    return math.exp(sum(losses) / (len(ids) - 1))


def speeds(models, prompt, new_tokens, reps):
    """{name: greedy tokens/s}, the models taking turns; median after one warm-up."""
    times = {name: [] for name in models}
    for i in range(reps + 1):
        for name, model in models.items() if i % 2 else reversed(models.items()):
            t0 = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: new_tokens / statistics.median(ts) for name, ts in times.items()}


def main():
    p = argument_parser(__doc__)
    p.add_argument("--model", required=True,
                   help="the model whose perplexity is compared: a .pt of ours, a size name or folder")
    p.add_argument("--text", required=True, help="a UTF-8 text the model was not trained on")
    p.add_argument("--n-layer", type=number(int, 1), default=12,
                   help="shape of the speed comparison (defaults: 124M)")
    p.add_argument("--n-head", type=number(int, 1), default=12)
    p.add_argument("--n-embd", type=number(int, 1), default=768)
    p.add_argument("--prompt-len", type=number(int, 1), default=32)
    p.add_argument("--new-tokens", type=number(int, 1), default=128)
    p.add_argument("--reps", type=number(int, 1), default=3)
    args = p.parse_args()

    rows = []
    model = load_model(args.model)
    with open(args.text, encoding="utf-8") as f:
        ids = load_tokenizer(args.model).encode(f.read())
    a, b = perplexity(model, ids), perplexity(quantize(model), ids)
    rows.append((f"perplexity of {args.model} on {args.text} ({len(ids):,} tokens)", f"{a:.3f}", f"{b:.3f}",
                 f"{b / a:.4f}x"))

    torch.manual_seed(0)
    fp32 = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
    models = {"fp32": fp32, "int8": quantize(fp32)}
    prompt = torch.randint(0, fp32.config.vocab_size, (1, args.prompt_len))
    s = speeds(models, prompt, args.new_tokens, args.reps)
    n_params = sum(p.numel() for p in fp32.parameters()) / 1e6
    rows.append((f"greedy generation, {n_params:.1f}M parameters, {args.prompt_len} + {args.new_tokens} "
                 "tokens, tokens/s", f"{s['fp32']:.1f}", f"{s['int8']:.1f}", f"{s['int8'] / s['fp32']:.2f}x"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}")
    print("\n| measurement | fp32 | int8 | int8 / fp32 |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    run(main)
