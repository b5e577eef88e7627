"""Instruction tuning: teach GPT-2 to follow Alpaca-style instructions, then let a
bigger model served by Ollama judge its answers (Raschka, "Build a Large Language
Model (From Scratch)", chapter 7).

    python finetune_instruct.py                                  # GPT-2 355M, full fine-tuning
    python finetune_instruct.py --lora-rank 16 --mask-prompt     # LoRA, loss on the responses only
    python finetune_instruct.py --judge out/instruct/responses.json   # score the answers with llama3

Training writes into --out-dir: best.pt, the checkpoint of lowest validation loss (a plain GPT
checkpoint: LoRA is merged into the weights), ckpt.pt for --resume, loss.png, and responses.json,
the best model's answers to the test split beside the references.
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import os

from cli import add_model_args, add_renamed, argument_parser, check_size_args, number
from devices import pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from files import write_json
from instruction import (add_lora_args, answer_all, encode, format_prompt, load_entries, respond, split,
                         train_on_answers, with_lora)
from judge import add_judge_args, score_responses
from loading import check_prerequisites, load_tokenizer
from trainer import add_training_args, build_model, start_run

DATA = "data/instruction-data.json"
DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json")
SAMPLE_TOKENS = 35  # length of the answer shown at each evaluation
OUT_FILES = ("best.pt", "loss.png", "responses.json")  # what a run writes into --out-dir, besides ckpt.pt
# What --resume cannot change: the model, the data and which examples each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "positions", "context_length",
                   "lora_rank", "lora_alpha", "mask_prompt", "batch_size", "seed")


def finetune(args, ckpt):
    device = pick_device(args.device)
    autocast = precision(args.dtype, device)
    model = build_model(args, ckpt, with_lora(args)).to(device).train()  # before the data: its refusals first
    path = ensure_file(args.data, DATA_URL) if args.data == DATA else args.data
    train_set, val_set, test_set = split(load_entries(path))
    print(f"{path}: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test entries")
    tokenizer = load_tokenizer(args.init_from)
    max_length = model.config.n_ctx  # (--context-length cut the model's window to it)

    train_data, val_data = ([encode(tokenizer, format_prompt(e), e["output"]) for e in entries]
                            for entries in (train_set, val_set))
    if args.mask_prompt:  # a prompt that fills the window leaves no answer token to learn from
        train_data, val_data = ([d for d in data if d[1] <= max_length] for data in (train_data, val_data))
        if not (train_data and val_data):
            raise UserError(f"every prompt is longer than --context-length {max_length}: raise it or drop "
                            "--mask-prompt")

    def sample():
        reply = respond(model, tokenizer, [format_prompt(val_set[0])], SAMPLE_TOKENS)[0]
        return f"{val_set[0]['instruction']!r} -> {reply!r}"

    model = train_on_answers(args, ckpt, model, tokenizer, {"train": train_data, "val": val_data}, sample,
                             args.mask_prompt, device)
    responses_path = os.path.join(args.out_dir, "responses.json")
    answers = answer_all(model, tokenizer, [format_prompt(e) for e in test_set], args, autocast,
                         "answering the test split")
    write_json([{**entry, "model_response": a} for entry, a in zip(test_set, answers)], responses_path)
    empty = sum(not a for a in answers)
    if empty:
        print(f"{empty} of {len(answers)} answers are empty: the model ends its answers at once; train it "
              "longer (more --epochs, a larger model or a higher --lr) before a judge is worth asking")
    print(f"wrote {responses_path}; score the answers with\n  python finetune_instruct.py --judge "
          f"{responses_path}")


def main():
    p = argument_parser(__doc__)
    p.add_argument("--data", default=DATA,
                   help="JSON list of {instruction, input, output}; downloaded when it is the "
                   "default and missing")
    add_model_args(p, "gpt2-medium")
    add_lora_args(p)
    p.add_argument("--mask-prompt", action="store_true", help="compute the loss on the responses only")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256,
                   help="longest answer to the test instructions")
    add_judge_args(p)
    add_renamed(p, "--evaluate", "--judge")
    add_training_args(p, out_dir="out/instruct", epochs=2, batch_size=8, lr=5e-5, beta2=0.95,
                      eval_interval=20)
    args = p.parse_args()
    check_size_args(args)
    if args.judge:
        score_responses(args)
        return
    check_prerequisites(args.init_from, args.data, DATA)
    args, ckpt = start_run(p, args, OUT_FILES, FIXED_ON_RESUME)
    finetune(args, ckpt)


if __name__ == "__main__":
    run(main)
