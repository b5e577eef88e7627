"""Fine-tune GPT-2 as an SMS spam classifier and measure it like a classifier.

The model reads a message, and the hidden state of its last token (the only position
that has seen the whole message; --pool mean averages every token's instead) goes through
a new 2-way head: ham or spam. Only the last few blocks, the final layer norm and the head
are trained (a model from scratch trains everything). The epoch of lowest validation loss
is kept (--patience stops early after that many epochs without a lower one).

    python finetune_spam.py --init-from gpt2                        # OpenAI's 124M weights
    python finetune_spam.py --init-from scratch --n-layer 4 --n-head 4 --n-embd 128 --context-length 300 \
        --trainable-blocks all --dropout 0.1 --lr 1e-3 --warmup-iters 65 --min-lr 0   # no weights: ~80 s of CPU
    python finetune_spam.py --classify "You won a free cruise, call now"
    python finetune_spam.py --seeds 0-9 ...                         # ten runs, out/spam/seed<S>/; mean, std, worst
"""

import argparse
import os
import random
import statistics
import time
import zipfile

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from common import UserError, add_device_arg, add_model_args, add_overwrite_arg, argument_parser, check_out_files, check_size_args, configure_optimizer, ensure_file, learning_rate, init_model, load_tokenizer, number, pick_device, plot_curves, run, save_atomic, train_layout, write_json
from gpt2 import GPT, GPTConfig, load_weights

DATA_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
DATA_FILE = "data/sms-spam/SMSSpamCollection"
LABELS = ["ham", "spam"]  # class index -> name; spam is the positive class
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}
PAD_ID = 50256  # <|endoftext|>; padding never reaches the prediction, see classify()


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
    split = {"train": balanced[:n_train], "validation": balanced[n_train:n_train + n_val], "test": balanced[n_train + n_val:]}
    if not all(split.values()):
        raise UserError(f"{len(balanced)} balanced messages ({n} spam) are too few to split 70/10/20 into "
                        "train, validation and test: use a larger collection")
    return split


def write_split(split, folder, seed):
    """Each part as folder/<part>-seed<seed>.tsv, in the source's own format."""
    os.makedirs(folder, exist_ok=True)
    for name, messages in split.items():
        path = os.path.join(folder, f"{name}-seed{seed}.tsv")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(f"{label}\t{text}\n" for label, text in messages)
        os.replace(path + ".tmp", path)


def load_data(path):
    """The collection at path; the default path is downloaded (and unzipped) when missing."""
    if not os.path.isfile(path):
        if path != DATA_FILE:
            raise UserError(f"{path} not found: pass --data path/to/SMSSpamCollection, or leave it out to download it")
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


def batches(examples, batch_size, device, generator=None):
    """[(ids, label)] -> (idx (B, T) padded with PAD_ID, lengths (B,), labels (B,)) per batch,
    each padded only to its own longest text; shuffled when a generator is given."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        rows = [examples[j] for j in order[i:i + batch_size]]
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        idx = torch.full((len(rows), int(lengths.max())), PAD_ID, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            idx[r, :len(ids)] = torch.tensor(ids)
        labels = torch.tensor([label for _, label in rows])
        yield idx.to(device), lengths.to(device), labels.to(device)


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
        raise UserError(f"--trainable-blocks {trainable_blocks}: give 'all' or a number from 0 to {len(blocks)}")
    model.requires_grad_(False)
    for module in [*blocks[len(blocks) - n:], model.transformer.ln_f, model.lm_head]:
        module.requires_grad_(True)


def load_classifier(path):
    if not os.path.isfile(path):
        raise UserError(f"no saved classifier at {path}: train one first with  python finetune_spam.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights only: never runs code
        model = with_class_head(GPT.empty(GPTConfig(**ckpt["config"])), ckpt.get("pool", "last"))
        load_weights(model, ckpt["model"], path)
    except Exception:  # not a checkpoint at all, or one of another model
        raise UserError(f"{path} is not a spam classifier of this project: train one with  python finetune_spam.py") from None
    return model.eval()


# -----------------------------------------------------------------------------
# Measuring: loss, accuracy, precision, recall, F1 and the confusion matrix.


@torch.no_grad()
def evaluate(model, examples, batch_size, device):
    """Mean loss and the metrics of the model's predictions on examples."""
    model.eval()
    total_loss, preds, labels = 0.0, [], []
    for idx, lengths, y in batches(examples, batch_size, device):
        logits = classify(model, idx, lengths)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        labels += y.tolist()
    return {"loss": total_loss / len(examples), **metrics(preds, labels)}


def metrics(preds, labels):
    """Spam is the positive class. confusion[true][predicted], rows and columns in LABELS order."""
    confusion = [[sum(1 for p, y in zip(preds, labels) if y == t and p == q) for q in range(2)] for t in range(2)]
    (tn, fp), (fn, tp) = confusion
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "confusion": confusion}


def print_report(report):
    print(f"{'split':<11} {'loss':>7} {'accuracy':>9} {'precision':>10} {'recall':>7} {'F1':>6}   confusion [[TN FP] [FN TP]]")
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
            seeds += range(int(low), int(high) + 1) if dash else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seeds like 0-9, 1,4,7 or 0-4,9, not {text}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must name each seed once (like 0-9), not {text}")
    return seeds


def parser():
    p = argument_parser(__doc__)
    p.add_argument("--classify", metavar="TEXT", help="print spam or ham for TEXT with the saved classifier, and stop")
    p.add_argument("--data", default=DATA_FILE, help="the SMSSpamCollection file (the default is downloaded if missing)")
    p.add_argument("--split-dir", default="data/sms-spam", help="where the train/validation/test split files go")
    p.add_argument("--out-dir", default="out/spam", help="classifier.pt, metrics.json and curves.png go here "
                   "(with --seeds: in its seed<S>/ folders, and the summary seeds.json in it)")
    add_model_args(p, "gpt2")
    p.add_argument("--context-length", type=number(int, 1), help="shorter context window (default: the model's own, 1024)")
    p.add_argument("--dropout", type=number(float, 0, 1), help="dropout rate (default: the model's own, 0)")
    p.add_argument("--trainable-blocks", default="1", help="train this many last blocks (+ final norm and head), or all")
    p.add_argument("--pool", choices=["last", "mean"], default="last", help="the head reads the last real token's "
                   "state (the book's), or the mean of every real token's")
    p.add_argument("--epochs", type=number(int, 1), default=5)
    p.add_argument("--patience", type=number(int, 1), help="stop after this many epochs without a lower validation "
                   "loss; None: train all --epochs")
    p.add_argument("--batch-size", type=number(int, 1), default=8)
    p.add_argument("--lr", type=number(float, 0), default=5e-5, help="peak learning rate")
    p.add_argument("--min-lr", type=number(float, 0), help="learning rate at the end of a cosine decay over all the steps; "
                   "None: --lr throughout (constant, as in the book)")
    p.add_argument("--warmup-iters", type=number(int, 0), default=0, help="steps of linear warmup to --lr")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.1, help="on weight matrices only")
    p.add_argument("--grad-clip", type=number(float, 0), default=0.0, help="clip the gradient norm to this; 0: no clipping")
    p.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.0, help="of the training loss "
                   "(validation and test losses are plain cross-entropy)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=123, help="seeds the balanced split and the training")
    seeds.add_argument("--seeds", type=seed_list, help="one run per seed (0-9, 1,4,7, ...), one after the other, "
                       "each in OUT_DIR/seed<S>/; then the mean, spread and worst of them")
    add_overwrite_arg(p, "--out-dir")
    add_device_arg(p)
    return p


def main():
    args = parser().parse_args()
    check_size_args(args)
    if args.classify is not None:
        if args.seeds:
            raise UserError("--classify uses one classifier: pass --out-dir OUT_DIR/seed<S> instead of --seeds")
        tokenizer = load_tokenizer()
        model = load_classifier(os.path.join(args.out_dir, "classifier.pt"))
        idx = torch.tensor([encode(tokenizer, args.classify, model.config.n_ctx)])
        with torch.no_grad():
            probs = F.softmax(classify(model, idx, torch.tensor([idx.size(1)])), dim=-1)[0]
        print(f"{LABELS[int(probs.argmax())]} {probs.max().item():.3f}")
        return

    seeds = args.seeds or [args.seed]
    out_dirs = {seed: os.path.join(args.out_dir, f"seed{seed}") if args.seeds else args.out_dir for seed in seeds}
    summary_path = os.path.join(args.out_dir, "seeds.json")
    # every seed's files are checked before the first one trains: a clash never stops a sweep halfway
    check_out_files([os.path.join(d, "classifier.pt") for d in out_dirs.values()] + ([summary_path] if args.seeds else []),
                    args.overwrite)
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.init_from)
    messages = load_data(args.data)
    reports = {}
    for n, seed in enumerate(seeds, 1):
        if args.seeds:
            print(f"\n=== seed {seed} ({n} of {len(seeds)}) -> {out_dirs[seed]}")
        reports[seed] = fine_tune(args, seed, out_dirs[seed], messages, tokenizer, device)
    if args.seeds:
        summary = summarize(reports)
        write_json({**summary, "args": {k: v for k, v in vars(args).items() if k != "seed"}}, summary_path)
        print(f"\n{len(seeds)} seeds, {torch.get_num_threads()} thread(s) each; summary in {summary_path}\n")
        print_summary(summary)


def fine_tune(args, seed, out_dir, messages, tokenizer, device):
    """Split with seed, fine-tune, keep the epoch of lowest validation loss in out_dir; -> its report."""
    start, start_cpu = time.time(), time.process_time()
    checkpoint_path = os.path.join(out_dir, "classifier.pt")
    split = balanced_split(messages, seed)
    write_split(split, args.split_dir, seed)
    print(", ".join(f"{name} {len(ms)}" for name, ms in split.items()), f"messages (half spam), split files in {args.split_dir}")
    torch.manual_seed(seed)
    model = with_class_head(init_model(args.init_from, args.context_length, args.dropout, n_layer=args.n_layer,
                                       n_head=args.n_head, n_embd=args.n_embd), args.pool)
    freeze_all_but(model, args.trainable_blocks)
    train_layout(model).to(device)
    data = {name: [(encode(tokenizer, text, model.config.n_ctx), LABELS.index(label)) for label, text in ms]
            for name, ms in split.items()}
    optimizer = configure_optimizer(model, args.lr, args.weight_decay)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters on {device}")

    history, best, generator = [], None, torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data["train"]) // args.batch_size)
    with tqdm(total=args.epochs * steps_per_epoch, desc="fine-tuning", unit="step") as bar:
        for epoch in range(1, args.epochs + 1):
            model.train()
            for i, (idx, lengths, y) in enumerate(batches(data["train"], args.batch_size, device, generator)):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate((epoch - 1) * steps_per_epoch + i, args.epochs * steps_per_epoch, args)
                loss = F.cross_entropy(classify(model, idx, lengths), y, label_smoothing=args.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            train, val = (evaluate(model, data[name], args.batch_size, device) for name in ("train", "validation"))
            history.append({"epoch": epoch, "train": train, "validation": val})
            saved = best is None or val["loss"] < best["validation"]["loss"]
            if saved:  # keep the epoch with the lowest validation loss
                best = history[-1]
                save_atomic(model.checkpoint(labels=LABELS, pool=args.pool, epoch=epoch, seed=seed), checkpoint_path)
            bar.write(f"epoch {epoch}: train loss {train['loss']:.4f} acc {train['accuracy']:.2%} | "
                      f"val loss {val['loss']:.4f} acc {val['accuracy']:.2%}" + (" | saved" if saved else ""))
            if args.patience and epoch - best["epoch"] >= args.patience:
                bar.write(f"no lower validation loss in {args.patience} epochs: stopping")
                break

    model = load_classifier(checkpoint_path).to(device)
    report = {name: evaluate(model, examples, args.batch_size, device) for name, examples in data.items()}
    print(f"best epoch {best['epoch']}, saved in {checkpoint_path}")
    print_report(report)
    epochs = [h["epoch"] for h in history]
    curves = {quantity: {name: (epochs, [h[name][quantity] for h in history]) for name in ("train", "validation")}
              for quantity in ("loss", "accuracy")}
    plot_curves(os.path.join(out_dir, "curves.png"), "epoch", curves)
    # all of the run, from the split to the plot; CPU time adds up every thread's
    timing = {"wall_s": time.time() - start, "cpu_s": time.process_time() - start_cpu, "threads": torch.get_num_threads()}
    metrics_path = os.path.join(out_dir, "metrics.json")
    write_json({**report, "best_epoch": best["epoch"], "time": timing, "history": history, "args": {**vars(args), "seed": seed}},
               metrics_path)
    print(f"{timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU; metrics in {metrics_path}, "
          f"curves in {os.path.join(out_dir, 'curves.png')}")
    return {**report, "best_epoch": best["epoch"], "time": timing}


def summarize(reports):
    """Per seed: best epoch, validation and test metrics, times; over the seeds: mean, std (n - 1) and worst."""
    rows = {seed: {"best_epoch": r["best_epoch"], "val_loss": r["validation"]["loss"], "val_accuracy": r["validation"]["accuracy"],
                   **{f"test_{k}": r["test"][k] for k in ("loss", "accuracy", "precision", "recall", "f1")},
                   "wall_s": r["time"]["wall_s"], "cpu_s": r["time"]["cpu_s"]} for seed, r in reports.items()}
    columns = list(next(iter(rows.values())))
    values = {c: [row[c] for row in rows.values()] for c in columns}
    mean = {c: statistics.fmean(v) for c, v in values.items()}
    std = {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in values.items()}
    worst = {c: (max if c.endswith(("loss", "_s")) else min)(v) for c, v in values.items() if c != "best_epoch"}
    return {"seeds": rows, "mean": mean, "std": std, "worst": worst}


def print_summary(summary):
    """A Markdown table: one row per seed, then the mean, the standard deviation and the worst."""
    def pct(x):
        return f"{x:.2%}".replace("%", " %")

    print("| seed | best epoch | val loss | val accuracy | test accuracy | test precision / recall / F1 | wall | CPU time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [*summary["seeds"].items(), ("**mean**", summary["mean"]), ("std", summary["std"]), ("**worst**", summary["worst"])]
    for name, r in rows:
        epoch = f"{r['best_epoch']:.3g}" if "best_epoch" in r else ""
        print(f"| {name} | {epoch} | {r['val_loss']:.4f} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} | "
              f"{pct(r['test_precision'])} / {pct(r['test_recall'])} / {pct(r['test_f1'])} | "
              f"{r['wall_s']:.1f} s | {r['cpu_s']:.1f} s |")


if __name__ == "__main__":
    run(main)
