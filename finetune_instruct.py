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

import copy
import os
import sys

import torch

from cli import add_model_args, add_renamed, argument_parser, check_size_args, number, progress_bar
from devices import check_training_memory, pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from files import write_json
from gpt2 import GPT
from instruction import collate, encode, format_prompt, load_entries, mean_loss, respond
from judge import add_judge_args, score_responses
from loading import check_prerequisites, load_tokenizer
from lora import add_lora, merge_lora
from trainer import (Task, Trainer, add_training_args, build_model, check_batches, configure_optimizer,
                     micro_batches, start_run)

DATA = "data/instruction-data.json"
DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json")
SPLIT = (0.85, 0.10)  # train, test; the remaining 5% is validation (the book's split, in file order)
SAMPLE_TOKENS = 35  # length of the answer shown at each evaluation
OUT_FILES = ("best.pt", "loss.png", "responses.json")  # what a run writes into --out-dir, besides ckpt.pt
# What --resume cannot change: the model, the data and which examples each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "positions", "context_length",
                   "lora_rank", "lora_alpha", "mask_prompt", "batch_size", "seed")


def split(entries):
    """The book's split, in file order: the first 85% train, the next 10% test, the last 5% validation."""
    n_train, n_test = int(len(entries) * SPLIT[0]), int(len(entries) * SPLIT[1])
    train, test, val = entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]
    if not (train and val and test):
        raise UserError(f"{len(entries)} entries are too few to split into train, validation and test")
    return train, val, test


def with_lora(args):
    """The script's adaptation of the model: LoRA's low-rank matrices where --lora-rank asks for them."""
    def adapt(model):
        if not args.lora_rank:
            return model
        if args.lora_rank > model.config.n_embd:
            raise UserError(f"--lora-rank {args.lora_rank} is above the model's width {model.config.n_embd}: "
                            "a rank past it adds nothing but memory (LoRA's ranks are 4 to 64)")
        return add_lora(model, args.lora_rank, args.lora_alpha)
    return adapt


def answer(model, tokenizer, entries, args, autocast):
    """Greedy answers to the entries' prompts, --batch-size at a time (each step of a batch reads the weights
    once for all its rows)."""
    answers = []
    for i in progress_bar(range(0, len(entries), args.batch_size), desc="answering the test split",
                          unit="batch"):
        with autocast:
            answers += respond(model, tokenizer, [format_prompt(e) for e in entries[i:i + args.batch_size]],
                               args.max_new_tokens)
    return answers


def finetune(args, ckpt):
    device = pick_device(args.device)
    autocast = precision(args.dtype, device)
    model = build_model(args, ckpt, with_lora(args)).to(device).train()  # before the data: its refusals first
    path = ensure_file(args.data, DATA_URL) if args.data == DATA else args.data
    train_set, val_set, test_set = split(load_entries(path))
    print(f"{path}: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test entries")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
          + (f", LoRA rank {args.lora_rank} alpha {args.lora_alpha}" if args.lora_rank
             else ", full fine-tuning"))

    tokenizer = load_tokenizer(args.init_from)
    max_length = model.config.n_ctx  # (--context-length cut the model's window to it)

    def make_batch(rows):
        return tuple(t.to(device) for t in collate(rows, tokenizer.eot_id, args.mask_prompt, max_length))

    train_data, val_data = ([encode(tokenizer, format_prompt(e), e["output"]) for e in entries]
                            for entries in (train_set, val_set))
    if args.mask_prompt:  # a prompt that fills the window leaves no answer token to learn from
        train_data, val_data = ([d for d in data if d[1] <= max_length] for data in (train_data, val_data))
        if not (train_data and val_data):
            raise UserError(f"every prompt is longer than --context-length {max_length}: raise it or drop "
                            "--mask-prompt")
    steps_per_epoch = check_batches(args, len(train_data), "entries")
    longest = min(max(len(ids) for ids, _ in train_data), max_length)
    check_training_memory(model, args.batch_size // args.grad_accum * longest, args.dtype, device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    trained = torch.compile(model) if args.compile else model

    def batches(step):
        return micro_batches(train_data, step, args, make_batch)

    def evaluate():
        return {name: mean_loss(trained, data, args.batch_size, args.eval_batches, make_batch, device)
                for name, data in (("train", train_data), ("val", val_data))}

    def sample():
        reply = respond(model, tokenizer, [format_prompt(val_set[0])], SAMPLE_TOKENS)[0]
        return f"{val_set[0]['instruction']!r} -> {reply!r}"

    def best():  # a plain GPT checkpoint: LoRA merged into the weights it changes
        return (merge_lora(copy.deepcopy(model)) if args.lora_rank else model).checkpoint(args=vars(args))

    task = Task(model, batches, evaluate, best, steps_per_epoch, model=trained, sample=sample)
    progress = Trainer(args, task, optimizer, ckpt).fit()
    if progress["stopped"]:
        sys.exit(130)
    best_path, responses_path = (os.path.join(args.out_dir, name) for name in ("best.pt", "responses.json"))
    print(f"best val loss {progress['best_val']:.3f}: saved {best_path}")
    model = GPT.from_pretrained(best_path).to(device)  # the answers come from the saved, best weights
    answers = answer(model, tokenizer, test_set, args, autocast)
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
    p.add_argument("--lora-rank", type=number(int, 0), default=0,
                   help="0 trains every weight; >0 trains only LoRA matrices of this rank")
    p.add_argument("--lora-alpha", type=number(float, 0), default=16.0,
                   help="LoRA scale: the update is multiplied by alpha / rank")
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
