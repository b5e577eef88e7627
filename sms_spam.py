"""The SMS Spam Collection (UCI): the file, balanced and split once per seed, as finetune_spam.py reads it."""

import os
import random
import zipfile

from errors import UserError
from fetch import ensure_file
from files import replaced

DATA_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
DATA_FILE = "data/sms-spam/SMSSpamCollection"
LABELS = ["ham", "spam"]  # class index -> name; spam is the positive class
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}



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


def write_split(split, folder, seed, overwrite):
    """Each part as folder/<part>-seed<seed>.tsv, in the source's own format; an earlier split of other
    messages is replaced only with --overwrite."""
    texts = {os.path.join(folder, f"{name}-seed{seed}.tsv"): "".join(f"{y}\t{text}\n" for y, text in part)
             for name, part in split.items()}
    for path, text in texts.items():
        if not overwrite and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                if f.read() != text:
                    raise UserError(f"{path} holds another split (of other --data): pass --overwrite to "
                                    "replace it, or another --split-dir")
    for path, text in texts.items():
        with replaced(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def load_data(path):
    """The collection at path; the default path is downloaded (and unzipped) when missing."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: --data takes the SMSSpamCollection file itself")
    if not os.path.isfile(path):
        if path != DATA_FILE:
            raise UserError(f"{path} not found: pass --data path/to/SMSSpamCollection, or leave it out "
                            "to download it")
        archive = os.path.join(os.path.dirname(path), "sms+spam+collection.zip")
        try:
            ensure_file(archive, DATA_URL)
        except UserError as e:
            raise UserError(f"{e}; or put the unzipped SMSSpamCollection at {path}, or pass --data FILE") \
                from None
        with zipfile.ZipFile(archive) as z:
            z.extract("SMSSpamCollection", os.path.dirname(path))
    return read_messages(path)
