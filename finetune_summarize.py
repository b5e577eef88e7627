"""Summarisation: teach GPT-2 to write the TL;DR of a Reddit post (the supervised step of Stiennon et al.
2020, "Learning to summarize from human feedback", on OpenAI's filtered TL;DR data), then measure its
summaries with ROUGE beside two baselines on the same test posts: the post's title taken as the summary,
and the model it started from asked zero-shot with "TL;DR:" as in the GPT-2 paper.

    python finetune_summarize.py                                        # GPT-2 124M, full fine-tuning
    python finetune_summarize.py --lora-rank 16 --max-examples 2000 --context-length 512   # CPU-sized
    python finetune_summarize.py --data my-articles.jsonl               # {document, summary} records
    python finetune_instruct.py --judge out/summarize/summaries.json    # an Ollama judge scores them

Training writes into --out-dir: best.pt, the checkpoint of lowest validation loss (a plain GPT checkpoint:
LoRA is merged into the weights), ckpt.pt for --resume, loss.png, summaries.json (each test post, its
reference and the generated summaries side by side, in the format finetune_instruct.py --judge scores)
and metrics.json (ROUGE-1, ROUGE-2 and ROUGE-L F1 of the model and of both baselines).
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import json
import os
import re

import torch

from cli import add_model_args, argument_parser, check_size_args, number
from devices import pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from files import write_json
from instruction import add_lora_args, answer_all, encode, respond, split, train_on_answers, with_lora
from loading import load_tokenizer
from trainer import add_training_args, build_model, start_run

DATA = "data/tldr"
DATA_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/datasets/tldr_3_filtered"
SPLITS = ("train", "valid", "test")  # a --data folder's files: train.jsonl, valid.jsonl, test.jsonl
TLDR_FIELDS = ("subreddit", "title", "post", "summary")  # a TL;DR record's; other records: document, summary
INSTRUCTION = "Summarize the post in one sentence (a TL;DR)."  # what summaries.json asks of the model
ROUGE = ("rouge1", "rouge2", "rougeL")
ZERO_SHOT = {"temperature": 1.0, "top_k": 2}  # the GPT-2 paper's TL;DR: sampling (its section 3.6) ...
ZERO_SHOT_SENTENCES = 3  # ... of which it kept the first three sentences
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
SAMPLE_TOKENS = 35  # length of the summary shown at each evaluation
OUT_FILES = ("best.pt", "loss.png", "summaries.json", "metrics.json")  # besides ckpt.pt
# What --resume cannot change: the model, the data and which examples each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "positions", "context_length",
                   "lora_rank", "lora_alpha", "batch_size", "seed", "max_examples", "too_long")


def tldr_prompt(record):
    """What the model reads before its summary: OpenAI's TL;DR query, or a document and "TL;DR:"."""
    if "document" in record:
        return f"{record['document']}\n\nTL;DR:"
    return (f"SUBREDDIT: r/{record['subreddit']}\n\nTITLE: {record['title']}\n\n"
            f"POST: {record['post']}\n\nTL;DR:")


def target(record):
    """What the model learns to write after the prompt (and <|endoftext|>): the summary after a space, as
    OpenAI formats it (" {reference}": the file's summaries do not begin with one)."""
    return " " + record["summary"].strip()


def check_record(record, where):
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a JSON object")
    for field in ("document", "summary") if "document" in record else TLDR_FIELDS:
        if field not in record:
            raise UserError(f"{where}: no {field!r} field (a record holds subreddit, title, post and "
                            "summary, or document and summary)")
        if not isinstance(record[field], str):
            raise UserError(f"{where}: {field!r} is not a string")
    if not record["summary"].strip():
        raise UserError(f"{where}: the summary is empty")
    return record


def load_records(path):
    """A JSONL file (a record a line) or a JSON list of records, each checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data is a JSONL file (or a JSON list) of records, or a folder "
                        "of train.jsonl, valid.jsonl and test.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path} is not a JSON list ({e})") from None
        records = [check_record(r, f"{path} entry {i}") for i, r in enumerate(items)]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path} line {n}: not JSON ({e})") from None
                records.append(check_record(record, f"{path} line {n}"))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def load_splits(args):
    """-> {"train", "val", "test": records}: a folder's three files (the default one downloaded where
    missing), or one file split in file order; the first --max-examples of train and as large a share of
    the others, --eval-examples of test."""
    if args.data == DATA:
        for name in SPLITS:
            ensure_file(os.path.join(DATA, f"{name}.jsonl"), f"{args.data_url.rstrip('/')}/{name}.jsonl")
    if os.path.isdir(args.data):
        splits = [load_records(os.path.join(args.data, f"{name}.jsonl")) for name in SPLITS]
    else:
        splits = split(load_records(args.data))
    n = min(args.max_examples or len(splits[0]), len(splits[0]))
    kept = [max(1, round(len(s) * n / len(splits[0]))) for s in splits]
    kept[2] = min(args.eval_examples, len(splits[2])) or kept[2]
    print(f"{args.data}: " + ", ".join(f"{k:,} {name}" + (f" (of {len(s):,})" if k < len(s) else "")
                                       for k, s, name in zip(kept, splits, ("train", "validation", "test")))
          + " posts")
    return dict(zip(("train", "val", "test"), (s[:k] for s, k in zip(splits, kept))))


def fit(tokenizer, record, n_ctx, cut):
    """(prompt, (ids, prompt_len)) of record, its post (or document) cut from the end where cut, until
    prompt, summary and <|endoftext|> fit n_ctx tokens; None when it does not fit."""
    field = "document" if "document" in record else "post"
    text = record[field]
    while True:
        prompt = tldr_prompt({**record, field: text})
        ids, prompt_len = encode(tokenizer, prompt, target(record))
        if len(ids) <= n_ctx:
            return prompt, (ids, prompt_len)
        if not cut or not text:
            return None
        text_ids = tokenizer.encode(text)  # its end cut by as many tokens as the example is over
        text = tokenizer.decode(text_ids[:max(0, len(text_ids) - (len(ids) - n_ctx))]).rstrip("\ufffd")


def prepare(tokenizer, splits, n_ctx, too_long):
    """Each split's (record, prompt, (ids, prompt_len)), the posts too long for n_ctx cut or skipped (said
    in one line) -> (those, the counts)."""
    examples, counts = {}, {"posts": 0, "too_long": 0, "dropped": 0}
    for name, records in splits.items():
        examples[name] = []
        for record in records:
            fitted = fit(tokenizer, record, n_ctx, cut=too_long == "cut")
            counts["posts"] += 1
            counts["too_long"] += fitted is None or fitted[0] != tldr_prompt(record)
            counts["dropped"] += fitted is None
            if fitted:
                examples[name].append((record, *fitted))
    line = f"{counts['too_long']:,} of {counts['posts']:,} posts "
    if too_long == "skip":
        print(line + f"skipped: longer than {n_ctx} tokens")
    else:
        dropped = (f" ({counts['dropped']:,} dropped: their title and summary alone are longer)"
                   if counts["dropped"] else "")
        print(line + f"cut to fit {n_ctx} tokens" + dropped)
    for name, found in examples.items():
        if not found:
            raise UserError(f"no {'validation' if name == 'val' else name} post fits in {n_ctx} tokens: "
                            "raise --context-length")
    return examples, counts


def first_sentences(text, n):
    """text up to the end of its n-th sentence (a run of . ! or ? before a space or the end)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[:ends[n - 1]] if len(ends) >= n else text


def title_of(record):
    """The title baseline: the post's title (a document without one: its first sentence)."""
    return record.get("title") or first_sentences(record["document"].strip(), 1)


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("the rouge-score package is not installed: pip install -r requirements.txt") from None
    return rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)


def rouge(scorer, references, summaries):
    """Mean F1 of each of ROUGE over the (reference, summary) pairs."""
    scores = [scorer.score(ref, summary) for ref, summary in zip(references, summaries)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE}


def measure(args, tuned, tokenizer, examples, counts, scorer, autocast, device):
    """The fine-tuned model's summaries of the test posts (tuned) beside the two baselines, and their ROUGE:
    into summaries.json and metrics.json, and a table."""
    records, prompts = [r for r, _, _ in examples["test"]], [p for _, p, _ in examples["test"]]
    base = build_model(args, None).to(device)  # the model it was fine-tuned from, as it started
    torch.manual_seed(args.seed)
    sampled = answer_all(base, tokenizer, prompts, args, autocast, "zero-shot summaries", **ZERO_SHOT)
    zero_shot = [first_sentences(s, ZERO_SHOT_SENTENCES) for s in sampled]
    summaries = {"fine_tuned": tuned, "title": [title_of(r) for r in records], "zero_shot": zero_shot}
    references = [r["summary"].strip() for r in records]
    scores = {name: rouge(scorer, references, s) for name, s in summaries.items()}
    out = {name: os.path.join(args.out_dir, f"{name}.json") for name in ("summaries", "metrics")}
    write_json([{"instruction": INSTRUCTION, "input": r.get("post", r.get("document")), "output": ref,
                 "model_response": tuned, "title_baseline": title, "zero_shot": zero,
                 **{k: r[k] for k in ("id", "subreddit", "title") if k in r}}
                for r, ref, tuned, title, zero
                in zip(records, references, tuned, summaries["title"], zero_shot)],
               out["summaries"])
    write_json({"rouge_f1": scores, "examples": {"train": len(examples["train"]),
                "validation": len(examples["val"]), "test": len(records)}, **counts,
                "args": vars(args)}, out["metrics"])
    header = f"ROUGE F1 x 100 on {len(records):,} test posts"
    print(f"\n{header:<38}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    for name, label in (("fine_tuned", "fine-tuned, greedy"), ("title", "the title as the summary"),
                        ("zero_shot", f"zero-shot TL;DR: from {args.init_from}")):
        print(f"{label:<38}" + "".join(f"{100 * scores[name][k]:9.2f}" for k in ROUGE))
    print(f"wrote {out['summaries']} and {out['metrics']}; an Ollama judge scores the summaries with\n"
          f"  python finetune_instruct.py --judge {out['summaries']}")


def finetune(args, ckpt):
    scorer = rouge_scorer()  # before the work it would measure
    device = pick_device(args.device)
    autocast = precision(args.dtype, device)
    model = build_model(args, ckpt, with_lora(args)).to(device).train()  # before the data: its refusals first
    splits = load_splits(args)
    tokenizer = load_tokenizer(args.init_from)
    examples, counts = prepare(tokenizer, splits, model.config.n_ctx, args.too_long)
    first = examples["val"][0]

    def sample(model=model):  # the model in training, bound now: it is let go of once trained
        return f"{title_of(first[0])[:60]!r} -> {respond(model, tokenizer, [first[1]], SAMPLE_TOKENS)[0]!r}"

    data = {name: [example for _, _, example in examples[name]] for name in ("train", "val")}
    # the loss on the summaries only
    best = train_on_answers(args, ckpt, model, tokenizer, data, sample, True, device)
    tuned = answer_all(best, tokenizer, [p for _, p, _ in examples["test"]], args, autocast,
                       "summarising the test posts")  # greedy, up to <|endoftext|>
    del model, sample, best  # out of memory before the model it started from comes in
    measure(args, tuned, tokenizer, examples, counts, scorer, autocast, device)


def main():
    p = argument_parser(__doc__)
    p.add_argument("--data", default=DATA,
                   help="a folder of train.jsonl, valid.jsonl and test.jsonl (the default: OpenAI's filtered "
                   "TL;DR, downloaded where missing), or one JSONL file (or JSON list) split in file order: "
                   "85%% train, 10%% test, 5%% validation. A record holds subreddit, title, post and "
                   "summary, "
                   "or document and summary")
    p.add_argument("--data-url", default=DATA_URL,
                   help="where the default --data folder's missing files are downloaded from: "
                   "URL/train.jsonl, ...")
    p.add_argument("--max-examples", type=number(int, 0), default=0,
                   help="train on the first N training posts (validation and test cut in proportion); 0: all")
    p.add_argument("--eval-examples", type=number(int, 0), default=0,
                   help="summarise and score the first N test posts; 0: the test split (cut as "
                   "--max-examples cuts it)")
    p.add_argument("--too-long", choices=["cut", "skip"], default="cut",
                   help="a post whose prompt and summary do not fit the window: cut the post from its end, "
                   "or skip it")
    add_model_args(p, "gpt2")
    add_lora_args(p)
    p.add_argument("--max-new-tokens", type=number(int, 1), default=100,
                   help="longest summary generated (the zero-shot baseline's 100 in the GPT-2 paper)")
    add_training_args(p, out_dir="out/summarize", epochs=1, batch_size=8, lr=5e-5, beta2=0.95,
                      eval_interval=500)
    args = p.parse_args()
    check_size_args(args)
    args, ckpt = start_run(p, args, OUT_FILES, FIXED_ON_RESUME)
    finetune(args, ckpt)


if __name__ == "__main__":
    run(main)
