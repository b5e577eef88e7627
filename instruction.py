"""Supervised fine-tuning on prompts and answers: the Alpaca prompt an instruction-tuned model reads before
it answers, the entries' file and its split, batches whose loss covers the answers, the training of
finetune_instruct.py and finetune_summarize.py (full or LoRA) and their answers in batches. The judge and
sample.py --instruction use it too."""

import copy
import json
import os
import sys

import torch

from cli import number, progress_bar
from devices import check_training_memory
from errors import UserError
from gpt2 import GPT
from lora import add_lora, merge_lora
from trainer import Task, Trainer, check_batches, configure_optimizer, micro_batches

IGNORE = -100  # target id that cross_entropy skips
SPLIT = (0.85, 0.10)  # train, test; the remaining 5% is validation (the book's split, in file order)


def format_prompt(entry):
    """The Alpaca prompt for {"instruction", "input" (may be empty or absent)}."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


def load_entries(path, required=("instruction", "output")):
    """A JSON list of objects whose `required` fields (and `input`, if present) are strings."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: expected a JSON list of entries with {', '.join(required)}")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except ValueError as e:  # not UTF-8, or not JSON
        raise UserError(f"{path} is not a UTF-8 JSON file ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} must hold a non-empty JSON list of entries")
    for i, entry in enumerate(entries):
        fields = (*required, "input") if isinstance(entry, dict) and "input" in entry else required
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in fields):
            raise UserError(f"{path}: entry {i} needs the string fields {', '.join(fields)}")
    return entries


def split(entries):
    """The book's split, in file order: the first 85% train, the next 10% test, the last 5% validation."""
    n_train, n_test = int(len(entries) * SPLIT[0]), int(len(entries) * SPLIT[1])
    train, test, val = entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]
    if not (train and val and test):
        raise UserError(f"{len(entries)} entries are too few to split into train, validation and test")
    return train, val, test


def encode(tokenizer, prompt, answer):
    """-> (prompt + answer + <|endoftext|> ids, prompt length in tokens)."""
    prompt_ids = tokenizer.encode(prompt)
    return prompt_ids + tokenizer.encode(answer) + [tokenizer.eot_id], len(prompt_ids)


def collate(batch, pad_id, mask_prompt=False, max_length=None):
    """[(ids, prompt_len), ...] -> inputs, targets (B, T). The targets are the inputs shifted
    by one: each row keeps its first <|endoftext|> (pad_id: so the model learns to stop) and the
    padding after it is IGNORE; mask_prompt also ignores the prompt, so only the answer
    counts. max_length truncates every row to at most that many positions."""
    rows = [(ids[:max_length + 1] if max_length else ids, prompt_len) for ids, prompt_len in batch]
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id)
    targets = torch.full((len(rows), T), IGNORE)
    for row, (ids, prompt_len) in enumerate(rows):
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
        if mask_prompt:
            # position prompt_len - 1 predicts the answer's first token
            targets[row, :prompt_len - 1] = IGNORE
    return inputs, targets


@torch.no_grad()
def mean_loss(model, data, batch_size, n_batches, make_batch, device):
    """Average loss over the first n_batches batches of data (0: all of it)."""
    losses = []
    for i in range(0, min(len(data), n_batches * batch_size) if n_batches else len(data), batch_size):
        inputs, targets = make_batch(data[i:i + batch_size])
        losses.append(model(inputs.to(device), targets.to(device))[1].item())
    return sum(losses) / len(losses)


@torch.no_grad()
def respond(model, tokenizer, prompts, max_new_tokens, **sampling):
    """Answers to the prompts (texts), generated as one batch, each stopping at <|endoftext|>; greedy unless
    sampling gives temperature, top_k, ..."""
    was_training = model.training
    model.eval()
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    outs = model.generate(ids, max_new_tokens, **{"temperature": 0, **sampling}, eos_id=tokenizer.eot_id)
    model.train(was_training)
    return [tokenizer.decode([t for t in out[len(p):] if t != tokenizer.eot_id]).strip()
            for p, out in zip(ids, outs)]


def answer_all(model, tokenizer, prompts, args, autocast, desc, **sampling):
    """respond() to the prompts, --batch-size at a time (each step of a batch reads the weights once for all
    its rows), each answer at most --max-new-tokens long."""
    answers = []
    for i in progress_bar(range(0, len(prompts), args.batch_size), desc=desc, unit="batch"):
        with autocast:
            answers += respond(model, tokenizer, prompts[i:i + args.batch_size], args.max_new_tokens,
                               **sampling)
    return answers


# -----------------------------------------------------------------------------
# Training on answers: the model full or with LoRA, trainer.py's loop, the best model back from best.pt.


def add_lora_args(parser):
    """The fine-tuning scripts' LoRA flags."""
    parser.add_argument("--lora-rank", type=number(int, 0), default=0,
                        help="0 trains every weight; >0 trains only LoRA matrices of this rank")
    parser.add_argument("--lora-alpha", type=number(float, 0), default=16.0,
                        help="LoRA scale: the update is multiplied by alpha / rank")


def with_lora(args):
    """The scripts' adaptation of the model: LoRA's low-rank matrices where --lora-rank asks for them."""
    def adapt(model):
        if not args.lora_rank:
            return model
        if args.lora_rank > model.config.n_embd:
            raise UserError(f"--lora-rank {args.lora_rank} is above the model's width {model.config.n_embd}: "
                            "a rank past it adds nothing but memory (LoRA's ranks are 4 to 64)")
        return add_lora(model, args.lora_rank, args.lora_alpha)
    return adapt


def train_on_answers(args, ckpt, model, tokenizer, data, sample, mask_prompt, device):
    """Fine-tune model (build_model's, with with_lora's adaptation) on data, {"train": [(ids, prompt_len),
    ...], "val": [...]}, in trainer.py's loop: the loss on the answers (only, with mask_prompt), best.pt a
    plain GPT checkpoint (LoRA merged into the weights it changes), sample() printed at each evaluation.
    Ctrl-C saves ckpt.pt and exits 130. -> the best model, read back from best.pt."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
          + (f", LoRA rank {args.lora_rank} alpha {args.lora_alpha}" if args.lora_rank
             else ", full fine-tuning"))
    max_length = model.config.n_ctx  # (--context-length cut the model's window to it)

    def make_batch(rows):
        return tuple(t.to(device) for t in collate(rows, tokenizer.eot_id, mask_prompt, max_length))

    steps_per_epoch = check_batches(args, len(data["train"]), "examples")
    longest = min(max(len(ids) for ids, _ in data["train"]), max_length)
    check_training_memory(model, args.batch_size // args.grad_accum * longest, args.dtype, device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    trained = torch.compile(model) if args.compile else model

    def batches(step):
        return micro_batches(data["train"], step, args, make_batch)

    def evaluate():
        return {name: mean_loss(trained, data[name], args.batch_size, args.eval_batches, make_batch, device)
                for name in ("train", "val")}

    def best():
        return (merge_lora(copy.deepcopy(model)) if args.lora_rank else model).checkpoint(args=vars(args))

    task = Task(model, batches, evaluate, best, steps_per_epoch, model=trained, sample=sample)
    progress = Trainer(args, task, optimizer, ckpt).fit()
    if progress["stopped"]:
        sys.exit(130)
    best_path = os.path.join(args.out_dir, "best.pt")
    print(f"best val loss {progress['best_val']:.3f}: saved {best_path}")
    return GPT.from_pretrained(best_path).to(device)  # what comes next comes from the saved, best weights
