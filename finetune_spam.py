"""Fine-tune GPT-2 as an SMS spam classifier and measure it like a classifier.

The model reads a message, and the hidden state of its last token (the only position
that has seen the whole message; --pool mean averages every token's instead) goes through
a new 2-way head: ham or spam. Only the last few blocks, the final layer norm and the head
are trained (a model from scratch trains everything). The step of lowest validation loss
is kept (--patience stops early after that many evaluations without a lower one).

    python finetune_spam.py --init-from gpt2                        # OpenAI's 124M weights
    # no weights: ~80 s of CPU
    python finetune_spam.py --init-from scratch --n-layer 4 --n-head 4 --n-embd 128 --context-length 300 \\
        --trainable-blocks all --dropout 0.1 --lr 1e-3 --warmup-iters 65 --min-lr 0
    python finetune_spam.py --classify "You won a free cruise, call now"
    python finetune_spam.py --seeds 0-9 ...                         # ten runs, out/spam/seed<S>/;
                                                                    # mean, std, worst
"""

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time
import zipfile

import torch
import torch.nn as nn
from torch.nn import functional as F

from cli import add_model_args, argument_parser, check_size_args, number
from devices import check_training_memory, pick_device, precision
from errors import UserError, run
from fetch import ensure_file
from files import check_out_files, read_checkpoint, replaced, write_json
from gpt2 import GPT, GPTConfig, load_weights
from loading import init_model, load_tokenizer, train_layout
from trainer import add_training_args, configure_optimizer, start_run, step_items, train

DATA_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
DATA_FILE = "data/sms-spam/SMSSpamCollection"
LABELS = ["ham", "spam"]  # class index -> name; spam is the positive class
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}
MAX_SEEDS = 1000  # --seeds runs one fine-tuning per seed, a minute or more each
# what a run writes into its out-dir, besides ckpt.pt
OUT_FILES = ("classifier.pt", "loss.png", "metrics.json")
# What --resume cannot change: the model, the data and which messages each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "context_length", "trainable_blocks",
                   "pool", "batch_size", "seed")


# -----------------------------------------------------------------------------
# Data: the UCI file, balanced and split once per seed.


def read_messages(path):
    """SMSSpamCollection: one 'label<TAB>text' per line -> [(label, text)]. Read line by line,
    not as CSV: a message starting with a quote is not a quoted field."""
    messages = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                label, tab, text = line.rstrip("\n").partition("\t")
                if not tab or label not in LABELS or not text.strip():
                    raise UserError(f"{path} line {n} is not 'ham|spam<TAB>text': {line[:60]!r}")
                messages.append((label, text))
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} after line {len(messages)})") from None
    for label in LABELS:
        if not any(m[0] == label for m in messages):
            raise UserError(f"{path} has no {label} messages: a classifier needs both")
    return messages


def balanced_split(messages, seed):
    """Keep every spam and as many randomly chosen ham, shuffle, cut 70/10/20.
    The same messages and seed always give the same split."""
    rng = random.Random(seed)
    by_label = {label: [m for m in messages if m[0] == label] for label in LABELS}
    n = min(len(ms) for ms in by_label.values())
    balanced = [m for ms in by_label.values() for m in rng.sample(ms, n)]
    rng.shuffle(balanced)
    n_train, n_val = int(len(balanced) * SPLITS["train"]), int(len(balanced) * SPLITS["validation"])
    split = {"train": balanced[:n_train], "validation": balanced[n_train:n_train + n_val],
             "test": balanced[n_train + n_val:]}
    if not all(split.values()):
        raise UserError(f"{len(balanced)} balanced messages ({n} spam) are too few to split 70/10/20 into "
                        "train, validation and test: use a larger collection")
    return split


def write_split(split, folder, seed):
    """Each part as folder/<part>-seed<seed>.tsv, in the source's own format."""
    for name, messages in split.items():
        with replaced(os.path.join(folder, f"{name}-seed{seed}.tsv")) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{label}\t{text}\n" for label, text in messages)


@functools.lru_cache(maxsize=1)  # (once for all the seeds of a sweep)
def load_data(path):
    """The collection at path; the default path is downloaded (and unzipped) when missing."""
    if not os.path.isfile(path):
        if path != DATA_FILE:
            raise UserError(f"{path} not found: pass --data path/to/SMSSpamCollection, or leave it out "
                            "to download it")
        archive = ensure_file(os.path.join(os.path.dirname(path), "sms+spam+collection.zip"), DATA_URL)
        with zipfile.ZipFile(archive) as z:
            z.extract("SMSSpamCollection", os.path.dirname(path))
    return read_messages(path)


def encode(tokenizer, text, n_ctx):
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the text is empty: nothing to classify")
    if len(ids) > n_ctx:
        raise UserError(f"a text of {len(ids)} tokens is longer than the model's context ({n_ctx}): "
                        f"{text[:40]!r}...; train with a longer --context-length")
    return ids


def collate(rows, pad_id, device):
    """[(ids, label)] -> (idx (B, T) padded with pad_id after each text, lengths (B,), labels (B,)),
    padded only to the batch's own longest text: padding never reaches the prediction (see classify)."""
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    idx = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        idx[r, :len(ids)] = torch.tensor(ids)
    return idx.to(device), lengths.to(device), torch.tensor([label for _, label in rows]).to(device)


# -----------------------------------------------------------------------------
# Model: GPT-2 with a 2-way head read at each text's last real token (or the mean of its tokens).


def with_class_head(model, pool="last"):
    """Swap the vocabulary head for a ham/spam one (this unties it from wte, which keeps its weights);
    pool: what the head reads, see classify()."""
    model.lm_head = nn.Linear(model.config.n_embd, len(LABELS))
    model.pool = pool
    return model


def classify(model, idx, lengths):
    """(B, T) right-padded ids and their real lengths -> (B, 2) logits, read at the last real token
    (index length - 1; pool "last") or averaged over all the real tokens (pool "mean"). Attention is
    causal, so no real token ever sees the padding after it."""
    hidden = model.hidden_states(idx)  # (B, T, C)
    if model.pool == "mean":
        real = torch.arange(idx.size(1), device=idx.device) < lengths[:, None]  # (B, T)
        return model.lm_head((hidden * real.unsqueeze(-1)).sum(1) / lengths[:, None])
    return model.lm_head(hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1])


def freeze_all_but(model, trainable_blocks):
    """Train only the last trainable_blocks blocks, the final layer norm and the head;
    'all' trains everything, embeddings too (what a model from scratch needs)."""
    if trainable_blocks == "all":
        return
    blocks, n = model.transformer.h, int(trainable_blocks) if trainable_blocks.isdigit() else -1
    if not 0 <= n <= len(blocks):
        raise UserError(f"--trainable-blocks {trainable_blocks}: give 'all' or a number from 0 to "
                        f"{len(blocks)}")
    model.requires_grad_(False)
    for module in [*blocks[len(blocks) - n:], model.transformer.ln_f, model.lm_head]:
        module.requires_grad_(True)


def build_classifier(args, ckpt):
    """The classifier to train: new (GPT-2 and a new head) or as ckpt.pt left it; only what trains
    trainable."""
    torch.manual_seed(args.seed)
    if ckpt:
        # it may change on resume
        dropout = ckpt["config"]["dropout"] if args.dropout is None else args.dropout
        model = with_class_head(GPT.empty(GPTConfig(**{**ckpt["config"], "dropout": dropout})), args.pool)
        load_weights(model, ckpt["model"], os.path.join(args.out_dir, "ckpt.pt"))
    else:
        model = with_class_head(init_model(args.init_from, args.context_length, args.dropout,
                                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd),
                                args.pool)
    freeze_all_but(model, args.trainable_blocks)
    return train_layout(model)


def load_classifier(path):
    ckpt = read_checkpoint(path, "a spam classifier", "train one first with  python finetune_spam.py",
                           needs=("config", "model", "labels"))
    try:
        model = with_class_head(GPT.empty(GPTConfig(**ckpt["config"])), ckpt.get("pool", "last"))
        load_weights(model, ckpt["model"], path)
    except (TypeError, ValueError):  # the config of another model, or weights that do not fit it
        raise UserError(f"{path} is not a spam classifier of this project: train one with  python "
                        "finetune_spam.py") from None
    return model.eval()


# -----------------------------------------------------------------------------
# Measuring: loss, accuracy, precision, recall, F1 and the confusion matrix.


@torch.no_grad()
def measure(model, examples, batch_size, pad_id, device, n_batches=0):
    """Mean loss and the metrics of the model's predictions on examples (the first n_batches batches; 0:
    all)."""
    total_loss, preds, labels = 0.0, [], []
    for i in range(0, len(examples) if not n_batches else min(len(examples), n_batches * batch_size),
                   batch_size):
        idx, lengths, y = collate(examples[i:i + batch_size], pad_id, device)
        logits = classify(model, idx, lengths).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        labels += y.tolist()
    return {"loss": total_loss / len(labels), **metrics(preds, labels)}


def metrics(preds, labels):
    """Spam is the positive class. confusion[true][predicted], rows and columns in LABELS order."""
    confusion = [[sum(1 for p, y in zip(preds, labels) if y == t and p == q) for q in range(2)]
                 for t in range(2)]
    (tn, fp), (fn, tp) = confusion
    precision_ = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision_ * recall / (precision_ + recall) if precision_ + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision_, "recall": recall, "f1": f1,
            "confusion": confusion}


def print_report(report):
    print(f"{'split':<11} {'loss':>7} {'accuracy':>9} {'precision':>10} {'recall':>7} {'F1':>6}   confusion "
          "[[TN FP] [FN TP]]")
    for name, m in report.items():
        print(f"{name:<11} {m['loss']:7.4f} {m['accuracy']:9.2%} {m['precision']:10.2%} {m['recall']:7.2%} "
              f"{m['f1']:6.2%}   {m['confusion']}")


# -----------------------------------------------------------------------------


def seed_list(text):
    """An argparse type: '0-9', '1,4,7' or '0-4,9' -> the list of seeds, in order, each once."""
    seeds = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            low, high = int(low), int(high) if dash else int(low)
            if high < low:
                raise argparse.ArgumentTypeError(f"{part.strip()} is an empty range: write the "
                                                 "smaller seed first")
            if len(seeds) + high - low + 1 > MAX_SEEDS:
                raise argparse.ArgumentTypeError(f"{text} names more than {MAX_SEEDS} seeds (a "
                                                 "fine-tuning each)")
            seeds += range(low, high + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seeds like 0-9, 1,4,7 or 0-4,9, not {text}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must name each seed once (like 0-9), not {text}")
    return seeds


def parser():
    p = argument_parser(__doc__)
    p.add_argument("--classify", metavar="TEXT",
                   help="print spam or ham for TEXT with the saved classifier, and stop")
    p.add_argument("--data", default=DATA_FILE,
                   help="the SMSSpamCollection file (the default is downloaded if missing)")
    p.add_argument("--split-dir", default="data/sms-spam",
                   help="where the train/validation/test split files go")
    add_model_args(p, "gpt2")
    p.add_argument("--trainable-blocks", default="1",
                   help="train this many last blocks (+ final norm and head), or all")
    p.add_argument("--pool", choices=["last", "mean"], default="last",
                   help="the head reads the last real token's state (the book's), or the mean of every "
                   "real token's")
    p.add_argument("--patience", type=number(int, 1), help="stop after this many evaluations without a lower "
                   "validation loss; None: train all the steps")
    p.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.0, help="of the training loss "
                   "(validation and test losses are plain cross-entropy)")
    p.add_argument("--seeds", type=seed_list,
                   help="one run per seed (0-9, 1,4,7, ...), one after the other, each in OUT_DIR/seed<S>/; "
                   "then the mean, spread and worst of them (with --resume: the sweep goes on)")
    add_training_args(p, out_dir="out/spam", epochs=5, batch_size=8, lr=5e-5, beta2=0.95, eval_batches=0)
    return p


def main():
    p = parser()
    args = p.parse_args()
    check_size_args(args)
    if args.seeds and args.seed != p.get_default("seed"):
        raise UserError("--seed and --seeds: give one of them")
    if args.classify is not None:
        if args.seeds:
            raise UserError("--classify uses one classifier: pass --out-dir OUT_DIR/seed<S> "
                            "instead of --seeds")
        tokenizer = load_tokenizer()
        model = load_classifier(os.path.join(args.out_dir, "classifier.pt"))
        idx = torch.tensor([encode(tokenizer, args.classify, model.config.n_ctx)])
        with torch.no_grad():
            probs = F.softmax(classify(model, idx, torch.tensor([idx.size(1)])), dim=-1)[0]
        print(f"{LABELS[int(probs.argmax())]} {probs.max().item():.3f}")
        return

    # Before the first file is written: every seed's out-dir (or what it resumes), the device, the data.
    runs, summary_path = {}, os.path.join(args.out_dir, "seeds.json")
    for seed in args.seeds or [args.seed]:
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None,
                                          "out_dir": os.path.join(args.out_dir, f"seed{seed}") if args.seeds
                                          else args.out_dir})
        if args.seeds and args.resume and not os.path.isfile(os.path.join(seed_args.out_dir, "ckpt.pt")):
            seed_args.resume = False  # a seed the sweep has not reached yet: it starts
        runs[seed] = start_run(p, seed_args, seed_args.out_dir, OUT_FILES, FIXED_ON_RESUME)
        runs[seed][0].out_dir, runs[seed][0].seeds = seed_args.out_dir, None  # (the sweep's, not its own)
    if args.seeds:
        check_out_files([summary_path], args.overwrite or args.resume)
    device = pick_device(args.device)
    amp = precision(args.dtype, device)
    tokenizer = load_tokenizer(args.init_from)
    reports = {}
    for n, (seed, (seed_args, ckpt)) in enumerate(runs.items(), 1):
        if args.seeds:
            print(f"\n=== seed {seed} ({n} of {len(runs)}) -> {seed_args.out_dir}")
        reports[seed] = fine_tune(seed_args, ckpt, tokenizer, device, amp)
        if reports[seed] is None:  # Ctrl-C: saved, the sweep stops here
            sys.exit(130)
    if args.seeds:
        summary = summarize(reports)
        write_json({**summary, "args": {k: v for k, v in vars(args).items() if k != "seed"}}, summary_path)
        print(f"\n{len(reports)} seeds, {torch.get_num_threads()} thread(s) each; summary in "
              f"{summary_path}\n")
        print_summary(summary)


def fine_tune(args, ckpt, tokenizer, device, amp):
    """Split with args.seed, fine-tune, keep the step of lowest validation loss; -> its report, None if
    stopped. Every check of the flags and the model comes before the first file is written (the data
    downloaded, the split files replaced)."""
    start, start_cpu = time.time(), time.process_time()
    metrics_path = os.path.join(args.out_dir, "metrics.json")
    if ckpt and os.path.isfile(metrics_path):  # (a sweep's finished seed)
        print(f"{metrics_path}: finished already")
        with open(metrics_path, encoding="utf-8") as f:
            return json.load(f)
    local = os.path.isfile(args.data) or args.data != DATA_FILE  # (checked before the model; writes nothing)
    messages = load_data(args.data) if local else None
    model = build_classifier(args, ckpt).to(device)
    # (the download comes after the checks)
    split = balanced_split(messages or load_data(args.data), args.seed)
    pad = tokenizer.eot_id
    data = {name: [(encode(tokenizer, text, model.config.n_ctx), LABELS.index(label)) for label, text in ms]
            for name, ms in split.items()}
    steps_per_epoch = len(data["train"]) // args.batch_size
    if not steps_per_epoch or args.batch_size % args.grad_accum:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum "
                        f"{args.grad_accum} and at most the {len(data['train'])} training messages")
    longest = max(len(ids) for ids, _ in data["train"])
    check_training_memory(model, args.batch_size // args.grad_accum * longest, args.dtype, device)
    write_split(split, args.split_dir, args.seed)
    print(", ".join(f"{name} {len(ms)}" for name, ms in split.items()),
          f"messages (half spam), split files in {args.split_dir}")
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}")
    trained = torch.compile(model) if args.compile else model

    def micro_batches(step):  # the step's messages in --grad-accum parts, each padded to its own longest
        rows = [data["train"][j] for j in step_items(len(data["train"]), step, args.batch_size, args.seed)]
        size = args.batch_size // args.grad_accum
        return [collate(rows[i:i + size], pad, device) for i in range(0, len(rows), size)]

    def loss_of(m, batch):
        idx, lengths, y = batch
        return F.cross_entropy(classify(m, idx, lengths), y, label_smoothing=args.label_smoothing)

    def evaluate():
        train_, val = (measure(model, data[name], args.batch_size, pad, device, args.eval_batches)
                       for name in ("train", "validation"))
        return {"train": train_["loss"], "val": val["loss"], "train_accuracy": train_["accuracy"],
                "val_accuracy": val["accuracy"]}

    progress = train(args, trained, optimizer, amp, args.max_iters or args.epochs * steps_per_epoch,
                     steps_per_epoch, micro_batches=micro_batches, loss_of=loss_of, evaluate=evaluate,
                     ckpt=ckpt, raw=model,
                     best=lambda: model.checkpoint(labels=LABELS, pool=args.pool, seed=args.seed),
                     best_name="classifier.pt", patience=args.patience)
    if progress["stopped"]:
        return None
    checkpoint_path = os.path.join(args.out_dir, "classifier.pt")
    best = load_classifier(checkpoint_path).to(device)
    with torch.no_grad(), amp[0]:
        report = {name: measure(best, examples, args.batch_size, pad, device)
                  for name, examples in data.items()}
    history = progress["history"]
    # (the first of the lowest is kept)
    best_step = history["step"][history["val"].index(min(history["val"]))]
    print(f"best step {best_step} (epoch {best_step / steps_per_epoch:.1f}), saved in {checkpoint_path}")
    print_report(report)
    # all of the run, from the split to the plot; CPU time adds up every thread's
    timing = {"wall_s": time.time() - start, "cpu_s": time.process_time() - start_cpu,
              "threads": torch.get_num_threads()}
    result = {**report, "best_step": best_step, "best_epoch": best_step / steps_per_epoch, "time": timing}
    write_json({**result, "history": progress["history"], "args": vars(args)}, metrics_path)
    print(f"{timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU; metrics in {metrics_path}")
    return result


def summarize(reports):
    """Per seed: best epoch, validation and test metrics, times; over the seeds: mean, std (n - 1) and
    worst."""
    rows = {seed: {"best_epoch": r["best_epoch"], "val_loss": r["validation"]["loss"],
                   "val_accuracy": r["validation"]["accuracy"],
                   **{f"test_{k}": r["test"][k] for k in ("loss", "accuracy", "precision", "recall", "f1")},
                   "wall_s": r["time"]["wall_s"], "cpu_s": r["time"]["cpu_s"]} for seed, r in reports.items()}
    columns = list(next(iter(rows.values())))
    values = {c: [row[c] for row in rows.values()] for c in columns}
    mean = {c: statistics.fmean(v) for c, v in values.items()}
    std = {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in values.items()}
    worst = {c: (max if c.endswith(("loss", "_s")) else min)(v) for c, v in values.items()
             if c != "best_epoch"}
    return {"seeds": rows, "mean": mean, "std": std, "worst": worst}


def print_summary(summary):
    """A Markdown table: one row per seed, then the mean, the standard deviation and the worst."""
    def pct(x):
        return f"{x:.2%}".replace("%", " %")

    print("| seed | best epoch | val loss | val accuracy | test accuracy | test precision / recall / F1 | "
          "wall | CPU time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [*summary["seeds"].items(), ("**mean**", summary["mean"]), ("std", summary["std"]),
            ("**worst**", summary["worst"])]
    for name, r in rows:
        epoch = f"{r['best_epoch']:.3g}" if "best_epoch" in r else ""
        print(f"| {name} | {epoch} | {r['val_loss']:.4f} | {pct(r['val_accuracy'])} | "
              f"{pct(r['test_accuracy'])} | {pct(r['test_precision'])} / {pct(r['test_recall'])} / "
              f"{pct(r['test_f1'])} | {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s |")


if __name__ == "__main__":
    run(main)
