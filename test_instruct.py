"""Tests for finetune_instruct.py: prompt, split, batch masks, LoRA, the whole training
path on a tiny model with the real instruction data, and the Ollama judge against a
fake server that speaks /api/chat."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from common import configure_optimizer
from finetune_instruct import (
    IGNORE, JUDGE_RETRIES, LoRALinear, add_lora, collate, encode, format_prompt, load_entries, merge_lora, split,
)
from gpt2 import GPT, GPTConfig, Tokenizer

INSTRUCT_ROOT = Path(__file__).resolve().parent
INSTRUCT_DATA = INSTRUCT_ROOT.parent / "shared" / "data" / "instruction-data.json"
INSTRUCT_ENV = {**os.environ, "TIKTOKEN_CACHE_DIR": str(INSTRUCT_ROOT.parent / "shared" / "data" / "tiktoken-cache")}
EOT = 50256


def instruct_script(*args, timeout=240):
    return subprocess.run([sys.executable, str(INSTRUCT_ROOT / "finetune_instruct.py"), *map(str, args)],
                          capture_output=True, text=True, env=INSTRUCT_ENV, timeout=timeout, cwd=INSTRUCT_ROOT)


def instruct_tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=EOT + 1, n_ctx=64, n_layer=2, n_head=4, n_embd=32))


# -----------------------------------------------------------------------------
# Prompt and data


def test_instruct_format_prompt_is_the_alpaca_text():
    head = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nRewrite the sentence in passive voice.")
    with_input = {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal."}
    assert format_prompt(with_input) == head + "\n\n### Input:\nThe chef cooked the meal.\n\n### Response:\n"
    assert format_prompt({**with_input, "input": ""}) == head + "\n\n### Response:\n"
    assert format_prompt({"instruction": with_input["instruction"]}) == head + "\n\n### Response:\n"


def test_instruct_split_of_the_real_data_is_85_5_10_and_fixed():
    entries = load_entries(INSTRUCT_DATA)
    train, val, test = split(entries, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(map(id, train + val + test)) == sorted(map(id, entries))  # a partition of the file
    again = split(entries, seed=123)
    assert [e["instruction"] for e in again[2]] == [e["instruction"] for e in test]
    assert [e["instruction"] for e in split(entries, seed=1)[2]] != [e["instruction"] for e in test]


# -----------------------------------------------------------------------------
# Batches


def test_instruct_collate_masks_token_by_token():
    batch = [([1, 2, 3, 4, EOT], 3), ([5, 6, EOT], 1)]  # (ids ending with <|endoftext|>, prompt length)
    inputs, targets = collate(batch)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, EOT, EOT]]
    assert targets.tolist() == [[2, 3, 4, EOT], [6, EOT, IGNORE, IGNORE]]  # first end-of-text kept, padding ignored
    _, masked = collate(batch, mask_prompt=True)
    assert masked.tolist() == [[IGNORE, IGNORE, 4, EOT], [6, EOT, IGNORE, IGNORE]]  # only answer tokens count
    inputs, targets = collate(batch, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, EOT]]
    assert targets.tolist() == [[IGNORE, IGNORE, 4], [6, EOT, IGNORE]]


def instruct_book_collate(batch, pad_token_id=EOT, ignore_index=-100, allowed_max_length=None):
    """Raschka's custom_collate_fn (chapter 7), as printed in the book: the reference."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_instruct_collate_of_real_entries_matches_the_book_and_masks_the_prompt():
    tok = Tokenizer()
    entries = load_entries(INSTRUCT_DATA)[:8]
    batch = [encode(tok, e) for e in entries]
    for entry, (ids, prompt_len) in zip(entries, batch):
        assert tok.decode(ids[:prompt_len]) == format_prompt(entry)
        assert tok.decode(ids[prompt_len:]) == entry["output"] + "<|endoftext|>"
    book = [tok.encode(format_prompt(e) + e["output"]) for e in entries]
    for max_length in (None, 40):
        inputs, targets = collate(batch, max_length=max_length)
        ref_inputs, ref_targets = instruct_book_collate(book, allowed_max_length=max_length)
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
    _, masked = collate(batch, mask_prompt=True)
    for row, (entry, (ids, prompt_len)) in enumerate(zip(entries, batch)):
        kept = [t for t in masked[row].tolist() if t != IGNORE]
        assert tok.decode(kept) == entry["output"] + "<|endoftext|>"  # exactly the answer and one end-of-text
        assert masked[row, prompt_len - 1] == ids[prompt_len]  # the last prompt position predicts the answer


# -----------------------------------------------------------------------------
# LoRA


def instruct_logits(state, x):
    model = instruct_tiny_gpt()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)[0]


def test_instruct_lora_trains_only_the_low_rank_matrices_and_merges_exactly():
    model = instruct_tiny_gpt()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    rank, alpha = 4, 8.0
    add_lora(model, rank, alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, L = 32, 2  # per block: c_attn (C -> 3C), attn c_proj (C -> C), c_fc (C -> 4C), mlp c_proj (4C -> C)
    assert trainable == L * rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    x = torch.randint(0, EOT, (2, 16))
    model.eval()
    with torch.no_grad():  # B starts at zero: the wrapped model is the pretrained one
        assert torch.equal(model(x)[0], instruct_logits(frozen, x))
    model.train()
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(lora) == 4 * L
    assert all(m.B.abs().sum() > 0 for m in lora.values())  # the update really trained
    state = model.state_dict()
    for key, value in frozen.items():  # every pretrained weight, bit for bit
        module, leaf = key.rsplit(".", 1)
        assert torch.equal(state[f"{module}.linear.{leaf}" if module in lora else key], value), key

    model.eval()
    with torch.no_grad():
        unmerged = model(x)[0]
        expected = {f"{n}.weight": m.linear.weight + (m.B @ m.A) * (alpha / rank) for n, m in lora.items()}
        merge_lora(model)
        merged = model(x)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(frozen)  # a plain GPT again
    for key, weight in expected.items():
        assert torch.equal(model.state_dict()[key], weight), key
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - instruct_logits(frozen, x)).abs().max() > 1e-3  # and it differs from the start
