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
import json
import math
import os
import re
import sys

import torch
import torch.nn as nn
from tqdm import tqdm

from cli import add_model_args, add_renamed, argument_parser, check_size_args, number
from devices import check_training_memory, pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from files import write_json
from gpt2 import GPT, GPTConfig, load_weights
from instruction import format_prompt
from loading import init_model, load_tokenizer, train_layout
from trainer import add_training_args, configure_optimizer, start_run, step_items, train

DATA = "data/instruction-data.json"
DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json")
SPLIT = (0.85, 0.10)  # train, test; the remaining 5% is validation (the book's split, in file order)
IGNORE = -100  # target id that cross_entropy skips
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer inside the blocks
SAMPLE_TOKENS = 35  # length of the answer shown at each evaluation
OUT_FILES = ("best.pt", "loss.png", "responses.json")  # what a run writes into --out-dir, besides ckpt.pt
# What --resume cannot change: the model, the data and which examples each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "context_length", "lora_rank",
                   "lora_alpha", "mask_prompt", "batch_size", "seed")
OLLAMA_URL = "http://localhost:11434"
JUDGE_MODEL = "llama3"
JUDGE_RETRIES = 2  # extra tries when the judge's reply is not a number
JUDGE_TIMEOUT = 300  # seconds; a big judge on a CPU is slow
JUDGE_PROMPT = (
    "Given the input `{prompt}` and correct output `{output}`, score the model response `{response}`"
    " on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
JUDGE_REMINDER = "That is not a score. Respond with one integer from 0 to 100 and nothing else."

# -----------------------------------------------------------------------------
# Data: the Alpaca prompt, a fixed split, and batches whose loss covers the answers.


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


def encode(tokenizer, entry):
    """-> (prompt + answer + <|endoftext|> ids, prompt length in tokens)."""
    prompt = tokenizer.encode(format_prompt(entry))
    return prompt + tokenizer.encode(entry["output"]) + [tokenizer.eot_id], len(prompt)


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


# -----------------------------------------------------------------------------
# LoRA: freeze the pretrained weights and learn a low-rank change to each linear layer.


class LoRALinear(nn.Module):
    """linear(x) + x A^T B^T * alpha / rank, with only A (rank, in) and B (out, rank) trained.
    B starts at zero, so training starts exactly from the pretrained model."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank

    def forward(self, x):
        return self.linear(x) + (x @ self.A.T @ self.B.T) * self.scale

    @torch.no_grad()
    def merge(self):
        """The plain linear layer with the low-rank change folded into its weight."""
        self.linear.weight += (self.B @ self.A) * self.scale
        return self.linear


def add_lora(model, rank, alpha):
    """Freeze every weight, then wrap the blocks' linear layers in LoRALinear."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged linear layer: a plain GPT again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    return model


# -----------------------------------------------------------------------------
# Training


def build_model(args, ckpt):
    """The model to train: new (from --init-from, with LoRA if asked) or as ckpt.pt left it."""
    torch.manual_seed(args.seed)
    if ckpt:
        # it may change on resume
        dropout = ckpt["config"]["dropout"] if args.dropout is None else args.dropout
        model = GPT.empty(GPTConfig(**{**ckpt["config"], "dropout": dropout}))
        model = add_lora(model, args.lora_rank, args.lora_alpha) if args.lora_rank else model
        load_weights(model, ckpt["model"], os.path.join(args.out_dir, "ckpt.pt"))
    else:
        model = init_model(args.init_from, args.context_length, args.dropout, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        model = add_lora(model, args.lora_rank, args.lora_alpha) if args.lora_rank else model
    return train_layout(model)


@torch.no_grad()
def mean_loss(model, data, batch_size, n_batches, make_batch, device):
    """Average loss over the first n_batches batches of data (0: all of it)."""
    losses = []
    for i in range(0, min(len(data), n_batches * batch_size) if n_batches else len(data), batch_size):
        inputs, targets = make_batch(data[i:i + batch_size])
        losses.append(model(inputs.to(device), targets.to(device))[1].item())
    return sum(losses) / len(losses)


@torch.no_grad()
def respond(model, tokenizer, entries, max_new_tokens):
    """Greedy answers to the entries' prompts, generated as one batch, each stopping at <|endoftext|>."""
    was_training = model.training
    model.eval()
    prompts = [tokenizer.encode(format_prompt(entry)) for entry in entries]
    outs = model.generate(prompts, max_new_tokens, temperature=0, eos_id=tokenizer.eot_id)
    model.train(was_training)
    return [tokenizer.decode([t for t in out[len(p):] if t != tokenizer.eot_id]).strip()
            for p, out in zip(prompts, outs)]


def finetune(args, ckpt):
    device = pick_device(args.device)
    amp = precision(args.dtype, device)
    model = build_model(args, ckpt).to(device).train()  # before the data: what it refuses is said first
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
        return collate(rows, tokenizer.eot_id, args.mask_prompt, max_length)

    train_data, val_data = ([encode(tokenizer, e) for e in entries] for entries in (train_set, val_set))
    if args.mask_prompt:  # a prompt that fills the window leaves no answer token to learn from
        train_data, val_data = ([d for d in data if d[1] <= max_length] for data in (train_data, val_data))
        if not (train_data and val_data):
            raise UserError(f"every prompt is longer than --context-length {max_length}: raise it or drop "
                            "--mask-prompt")
    steps_per_epoch = len(train_data) // args.batch_size
    if not steps_per_epoch or args.batch_size % args.grad_accum:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum "
                        f"{args.grad_accum} and at most the {len(train_data)} training entries")
    longest = min(max(len(ids) for ids, _ in train_data), max_length)
    check_training_memory(model, args.batch_size // args.grad_accum * longest, args.dtype, device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    trained = torch.compile(model) if args.compile else model

    def micro_batches(step):  # the step's examples in --grad-accum parts, each padded to its own longest
        rows = [train_data[j] for j in step_items(len(train_data), step, args.batch_size, args.seed)]
        size = args.batch_size // args.grad_accum
        return [tuple(t.to(device) for t in make_batch(rows[i:i + size])) for i in range(0, len(rows), size)]

    def evaluate():
        return {name: mean_loss(trained, data, args.batch_size, args.eval_batches, make_batch, device)
                for name, data in (("train", train_data), ("val", val_data))}

    def sample():
        return (f"{val_set[0]['instruction']!r} -> "
                f"{respond(model, tokenizer, val_set[:1], SAMPLE_TOKENS)[0]!r}")

    def best():  # a plain GPT checkpoint: LoRA merged into the weights it changes
        return (merge_lora(copy.deepcopy(model)) if args.lora_rank else model).checkpoint(args=vars(args))

    progress = train(args, trained, optimizer, amp, args.max_iters or args.epochs * steps_per_epoch,
                     steps_per_epoch, micro_batches=micro_batches, loss_of=lambda m, batch: m(*batch)[1],
                     evaluate=evaluate, best=best, ckpt=ckpt, raw=model, sample=sample)
    if progress["stopped"]:
        sys.exit(130)
    best_path, responses_path = (os.path.join(args.out_dir, name) for name in ("best.pt", "responses.json"))
    print(f"best val loss {progress['best_val']:.3f}: saved {best_path}")
    model = GPT.from_pretrained(best_path).to(device)  # the answers come from the saved, best weights
    answers = []  # in batches: each step of a batch reads the weights once for all its rows
    for i in tqdm(range(0, len(test_set), args.batch_size), desc="answering the test split", unit="batch"):
        with amp[0]:
            answers += respond(model, tokenizer, test_set[i:i + args.batch_size], args.max_new_tokens)
    write_json([{**entry, "model_response": answer} for entry, answer in zip(test_set, answers)],
               responses_path)
    print(f"wrote {responses_path}; score the answers with\n  python finetune_instruct.py --judge "
          f"{responses_path}")


# -----------------------------------------------------------------------------
# The judge: an instruction-tuned model served by Ollama scores each answer 0-100.


def ask_ollama(url, model, messages, seed):
    """One non-streamed reply from Ollama's /api/chat, deterministic (temperature 0, fixed seed)."""
    import requests

    body = {"model": model, "messages": messages, "stream": False,
            "options": {"temperature": 0, "seed": seed}}
    try:
        r = requests.post(f"{url.rstrip('/')}/api/chat", json=body, timeout=JUDGE_TIMEOUT)
    except requests.ConnectionError:
        raise UserError(f"cannot reach Ollama at {url}: start it with `ollama serve`, or pass "
                        "--ollama-url") from None
    except requests.Timeout:
        raise UserError(f"Ollama at {url} gave no answer in {JUDGE_TIMEOUT} s") from None
    try:
        reply = r.json()
    except ValueError:
        reply = {}
    # an HTML error page, as one line of its text
    page = " ".join(re.sub(r"<[^>]*>", " ", r.text).split())[:200]
    error = reply.get("error", page) if isinstance(reply, dict) else page
    if r.status_code == 404 and "not found" in str(error) and "model" in str(error):
        raise UserError(f"Ollama at {url} has no model {model!r} ({error}): run `ollama pull {model}`, "
                        "or pass --judge-model")
    if not r.ok:
        raise UserError(f"Ollama at {url} answered HTTP {r.status_code}: {error}")
    content = reply.get("message", {}).get("content") if isinstance(reply, dict) else None
    if not isinstance(content, str):
        raise UserError(f"{url}/api/chat did not answer with Ollama's chat JSON (a message with text "
                        "content): is it an Ollama server?")
    return content


def parse_score(reply):
    """'85' (spaces or a final '.' allowed) -> 85; anything that is not one number in 0..100 -> None."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*\.?\s*", reply)
    if m is None or float(m.group(1)) > 100:
        return None
    score = float(m.group(1))
    return int(score) if score.is_integer() else score


def judge(entry, url, model, seed):
    """The judge's score for entry["model_response"], or None when it never replies with a number."""
    prompt = JUDGE_PROMPT.format(prompt=format_prompt(entry), output=entry["output"],
                                 response=entry["model_response"])
    messages = [{"role": "user", "content": prompt}]
    for _ in range(1 + JUDGE_RETRIES):
        reply = ask_ollama(url, model, messages, seed)
        score = parse_score(reply)
        if score is not None:
            return score, reply
        # Same prompt, temperature 0 and seed would give the same reply: point out the mistake instead.
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": JUDGE_REMINDER}]
    return None, reply


def score_responses(args):
    """Score every entry of the responses file; an entry the judge gives no score keeps the one it had (an
    earlier run's, or null), and a run that gives no score at all leaves the file as it was."""
    entries = load_entries(args.judge, required=("instruction", "output", "model_response"))
    scores = []
    for i, entry in enumerate(tqdm(entries, desc=f"judging with {args.judge_model}")):
        score, reply = judge(entry, args.ollama_url, args.judge_model, args.seed)
        if score is None:
            tqdm.write(f"entry {i}: the judge's reply {reply[:80]!r} is not a score after "
                       f"{1 + JUDGE_RETRIES} tries: counted as failed")
        else:
            tqdm.write(f"entry {i}: score {score}")
        scores.append(score)
    valid = [s for s in scores if s is not None]
    failed = len(scores) - len(valid)
    if not valid:
        raise UserError(f"the judge gave no score to any of the {len(scores)} entries: {args.judge} is "
                        "left as it was")
    for entry, score in zip(entries, scores):
        entry["score"] = score if score is not None else entry.get("score")
    write_json(entries, args.judge)
    print(f"mean score {sum(valid) / len(valid):.2f} over {len(valid)} entries"
          + (f" ({failed} failed, not counted; they keep their earlier score)" if failed else "")
          + f"; scores written to {args.judge}")


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
    p.add_argument("--judge", metavar="RESPONSES",
                   help="score this responses JSON with the Ollama judge instead of training")
    add_renamed(p, "--evaluate", "--judge")
    p.add_argument("--ollama-url", default=OLLAMA_URL)
    p.add_argument("--judge-model", default=JUDGE_MODEL)
    add_training_args(p, out_dir="out/instruct", epochs=2, batch_size=8, lr=5e-5, beta2=0.95,
                      eval_interval=20)
    args = p.parse_args()
    check_size_args(args)
    if args.judge:
        score_responses(args)
        return
    args, ckpt = start_run(p, args, args.out_dir, OUT_FILES, FIXED_ON_RESUME)
    finetune(args, ckpt)


if __name__ == "__main__":
    run(main)
