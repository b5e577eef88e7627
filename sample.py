"""Continue a prompt with GPT-2, printing the text as it is generated.

    python sample.py --prompt "Every effort moves you"
    python sample.py --model gpt2-medium --temperature 0.7 --top-p 0.9 --num-samples 3
    python sample.py --int8 --prompt "Every effort moves you"        # int8 weights: faster on a CPU
    python sample.py --model out/instruct/best.pt --instruction "Rewrite the sentence in passive voice." \\
        --input "The chef cooked the meal."

--model is a size name (its weights from download_weights.py), a model folder (OpenAI's, or
a Hugging Face GPT-2 folder) or a checkpoint written by this project's scripts. A prompt longer than the
model's context window is an error; the generated text itself may run past it (the window then slides).
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

from itertools import takewhile

import torch

from cli import SEED, add_device_arg, argument_parser, number
from devices import check_memory, pick_device
from errors import UserError, run
from instruction import format_prompt
from int8 import quantize
from loading import load_model, load_tokenizer


def print_as_generated(ids, tokenizer):
    """Print the text of token ids as they come, each token's text once (the work grows with the length, not
    its square). A character split over tokens decodes as U+FFFD until its last byte arrives: those tokens
    wait for the next one (4 at most: a character is at most 4 bytes)."""
    pending = []
    for i in ids:
        pending.append(i)
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd") or len(pending) == 4:
            print(text, end="", flush=True)
            pending = []
    print(tokenizer.decode(pending))


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="124M",
                        help="124M, 355M, 774M, 1558M (or gpt2, gpt2-medium, ...), a folder or a .pt")
    parser.add_argument("--prompt", default="Every effort moves you",
                        help="the text to continue; empty = start a new document")
    parser.add_argument("--instruction", help="answer this instruction instead (Alpaca prompt, as "
                        "finetune_instruct.py trains)")
    parser.add_argument("--input", default="", help="the input that goes with --instruction")
    parser.add_argument("--max-new-tokens", type=number(int, 1), default=100,
                        help="length of each sample, in tokens")
    parser.add_argument("--temperature", type=number(float, 0), default=1.0,
                        help="0 = always the likeliest token")
    parser.add_argument("--top-k", type=number(int, 0), default=40,
                        help="sample among the k likeliest tokens (GPT-2's paper used 40); 0 = all")
    parser.add_argument("--top-p", type=number(float, 0, 1), default=None,
                        help="sample among the fewest tokens whose probabilities sum to p")
    parser.add_argument("--seed", type=SEED, default=1337,
                        help="the same seed gives the same text")
    parser.add_argument("--num-samples", type=number(int, 1), default=1,
                        help="samples of the same prompt, generated as one batch")
    parser.add_argument("--int8", action="store_true",
                        help="generate with int8 weights in every matrix (int8.py), on the CPU: faster, "
                        "as good to within about 1%% in perplexity")
    add_device_arg(parser)
    args = parser.parse_args()

    device = pick_device("cpu" if args.int8 and args.device == "auto" else args.device)
    if args.int8 and device != "cpu":
        raise UserError(f"--int8 runs on the CPU, not {device}: add --device cpu")
    model = load_model(args.model)
    model = quantize(model) if args.int8 else model.to(device)
    tokenizer = load_tokenizer(args.model)
    if args.instruction is not None:  # the exact prompt finetune_instruct.py tuned the model on
        prompt, eos_id = (format_prompt({"instruction": args.instruction, "input": args.input}),
                          tokenizer.eot_id)
    else:  # a base model: <|endoftext|> only separates documents, so keep going past it
        prompt, eos_id = args.prompt, None
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]  # nothing to continue: begin a new document
    if len(ids) > model.config.n_ctx:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's context window "
                        f"({model.config.n_ctx}): shorten it")
    idx = torch.tensor([ids], device=device)

    torch.manual_seed(args.seed)
    settings = (args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, eos_id)
    shown = "" if args.instruction is not None else args.prompt
    if args.num_samples == 1:
        print(shown, end="", flush=True)
        stream = (t.item() for t in model.stream(idx, *settings))
        print_as_generated(takewhile(lambda t: t != eos_id, stream), tokenizer)
        return
    # Several samples run as one batch: each step reads the weights once for all of them, and each sample
    # keeps its keys and values of every block (the attention cache) and its logits.
    c, kept = model.config, min(len(ids) + args.max_new_tokens, model.config.n_ctx)
    per_sample = (2 * c.n_layer * kept * c.n_embd * model.transformer.wte.weight.element_size()
                  + 16 * c.vocab_size)
    check_memory(args.num_samples * per_sample, device, f"{args.num_samples:,} samples",
                 "--num-samples or --max-new-tokens")
    for i, out in enumerate(model.generate([ids] * args.num_samples, *settings)):
        new = out[len(ids):]
        print(("\n" + "-" * 40 + "\n" if i else "") + shown
              + tokenizer.decode(new[:-1] if new[-1:] == [eos_id] else new))


if __name__ == "__main__":
    run(main)
