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

tools/spam_seeds.py runs the same fine-tuning over several seeds and tabulates them.
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from cli import add_model_args, argument_parser, check_size_args, number
from devices import check_training_memory, pick_device, precision
from errors import UserError, run
from files import read_checkpoint, write_json
from gpt2 import GPT, GPTConfig, load_weights
from loading import check_prerequisites, load_tokenizer
from sms_spam import DATA_FILE, LABELS, balanced_split, load_data, write_split
from trainer import (Task, Trainer, add_training_args, build_model, check_batches, configure_optimizer,
                     micro_batches, start_run)

# what a run writes into its out-dir, besides ckpt.pt
OUT_FILES = ("classifier.pt", "loss.png", "metrics.json")
# What --resume cannot change: the model, the data and which messages each step trains on.
FIXED_ON_RESUME = ("data", "init_from", "n_layer", "n_head", "n_embd", "positions", "context_length",
                   "trainable_blocks", "pool", "batch_size", "seed")


# -----------------------------------------------------------------------------
# Model inputs: token ids, padded per batch.


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
    model = build_model(args, ckpt, lambda model: with_class_head(model, args.pool))
    freeze_all_but(model, args.trainable_blocks)
    return model


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
    add_training_args(p, out_dir="out/spam", epochs=5, batch_size=8, lr=5e-5, beta2=0.95, eval_batches=0)
    return p


def classify_text(args):
    """--classify: the saved classifier's label and probability for one text."""
    path = os.path.join(args.out_dir, "classifier.pt")
    model = load_classifier(path)
    idx = torch.tensor([encode(load_tokenizer(), args.classify, model.config.n_ctx)])
    with torch.no_grad():
        probs = F.softmax(classify(model, idx, torch.tensor([idx.size(1)])), dim=-1)[0]
    print(f"{LABELS[int(probs.argmax())]} {probs.max().item():.3f}")
    if not os.path.isfile(os.path.join(args.out_dir, "metrics.json")):  # written when a run ends
        step = read_checkpoint(path, "a spam classifier", "", needs=("step",), mmap=True)["step"]
        print(f"note: {path} is from step {step} of a run that has not finished: python finetune_spam.py "
              f"--resume --out-dir {args.out_dir} finishes it", file=sys.stderr)


def main():
    p = parser()
    args = p.parse_args()
    check_size_args(args)
    if args.classify is not None:
        classify_text(args)
        return
    check_prerequisites(args.init_from, args.data, DATA_FILE)
    args, ckpt = start_run(p, args, OUT_FILES, FIXED_ON_RESUME)
    device = pick_device(args.device)
    report = fine_tune(args, ckpt, load_tokenizer(args.init_from), device, precision(args.dtype, device))
    if report is None:  # Ctrl-C: saved
        sys.exit(130)


def fine_tune(args, ckpt, tokenizer, device, autocast):
    """Split with args.seed, fine-tune, keep the step of lowest validation loss; -> its report, None if
    stopped. Every check of the flags and the model comes before the first file is written (the data
    downloaded, the split files replaced)."""
    start, start_cpu = time.time(), time.process_time()
    local = os.path.isfile(args.data) or args.data != DATA_FILE  # (checked before the model; writes nothing)
    messages = load_data(args.data) if local else None
    model = build_classifier(args, ckpt).to(device)
    # (the download comes after the checks)
    split = balanced_split(messages or load_data(args.data), args.seed)
    pad = tokenizer.eot_id
    data = {name: [(encode(tokenizer, text, model.config.n_ctx), LABELS.index(label)) for label, text in ms]
            for name, ms in split.items()}
    steps_per_epoch = check_batches(args, len(data["train"]), "messages")
    longest = max(len(ids) for ids, _ in data["train"])
    check_training_memory(model, args.batch_size // args.grad_accum * longest, args.dtype, device)
    write_split(split, args.split_dir, args.seed, args.overwrite or args.resume)
    print(", ".join(f"{name} {len(ms)}" for name, ms in split.items()),
          f"messages (half spam), split files in {args.split_dir}")
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, betas=(0.9, args.beta2))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}")

    def batches(step):  # the step's messages in --grad-accum parts, each padded to its own longest
        return micro_batches(data["train"], step, args, lambda rows: collate(rows, pad, device))

    def loss(m, batch):
        idx, lengths, y = batch
        return F.cross_entropy(classify(m, idx, lengths), y, label_smoothing=args.label_smoothing)

    def evaluate():
        train_, val = (measure(model, data[name], args.batch_size, pad, device, args.eval_batches)
                       for name in ("train", "validation"))
        return {"train": train_["loss"], "val": val["loss"], "train_accuracy": train_["accuracy"],
                "val_accuracy": val["accuracy"]}

    task = Task(model, batches, evaluate, steps_per_epoch=steps_per_epoch, loss=loss,
                model=torch.compile(model) if args.compile else model,
                best=lambda: model.checkpoint(labels=LABELS, pool=args.pool, seed=args.seed),
                best_name="classifier.pt", patience=args.patience)
    progress = Trainer(args, task, optimizer, ckpt).fit()
    if progress["stopped"]:
        return None
    checkpoint_path = os.path.join(args.out_dir, "classifier.pt")
    best = load_classifier(checkpoint_path).to(device)
    with torch.no_grad(), autocast:
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
    write_json({**result, "history": progress["history"], "args": vars(args)},
               os.path.join(args.out_dir, "metrics.json"))
    print(f"{timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU; metrics in "
          f"{os.path.join(args.out_dir, 'metrics.json')}")
    return result


if __name__ == "__main__":
    run(main)
