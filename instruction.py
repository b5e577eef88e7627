"""Supervised fine-tuning on prompts and answers: the Alpaca prompt an instruction-tuned model reads before
it answers, the entries' file, batches whose loss covers the answers, and greedy answers in batches.
finetune_instruct.py, the judge and sample.py --instruction use it."""

import json
import os

import torch

from errors import UserError

IGNORE = -100  # target id that cross_entropy skips


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
