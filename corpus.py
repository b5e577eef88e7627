"""The token cache of a corpus: a text file, or a folder of .txt files, tokenized once into shards of uint16
ids beside it (<data>.tokens/: shard_00000.bin, ... and manifest.json), then read lazily as one sequence.

The text is read in pieces of about CHUNK_CHARS characters, cut only where GPT-2's pre-tokenizer never joins
across (the tokens are exactly tiktoken's of each whole file), and encoded by worker processes (one per core),
as build-nanogpt's fineweb.py does. manifest.json records each file's size and modification time: a changed
or added file is tokenized again from it on, the files before it are kept.

    python train.py --data corpus/ --prepare-only     # prepare the cache of corpus/, print its tokens, exit
"""

import bisect
import json
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from glob import glob

import numpy as np
from tqdm import tqdm

from common import UserError, write_json

CHUNK_CHARS = 1 << 20  # characters read and encoded at a time: preparation holds a few pieces per worker
WORKERS = os.cpu_count() or 1  # processes that tokenize
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB of uint16), as build-nanogpt's FineWeb shards


def text_files(path):
    """A text file, or the .txt files anywhere under a folder, sorted by path."""
    if os.path.isdir(path):
        files = sorted(glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise UserError(f"no .txt files in {path}: --data takes a text file or a folder of .txt files")
        return files
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data takes a text file or a folder of .txt files")
    return [path]


def cut_point(text):
    """The last place text can be cut without changing its tokens, 0 if none: before a newline or
    space that precedes a letter or digit. GPT-2's pre-tokenizer never joins across it (the space
    or newline starts a piece of its own or the next word's; whitespace before it ends a piece
    either way), so encode(a) + encode(b) == encode(a + b)."""
    for sep in "\n ":
        i = len(text)
        while (i := text.rfind(sep, 0, i)) > 0:
            if text[i + 1:i + 2].isalnum():
                return i
    return 0


def read_pieces(files):
    """((file index, is its last piece), text) for pieces of about CHUNK_CHARS characters of each file
    in turn: a file is never held whole, and its pieces encode to exactly the file's tokens."""
    for n, f in enumerate(files):
        try:
            with open(f, encoding="utf-8") as fh:  # text mode decodes characters split between reads
                text = ""
                while block := fh.read(CHUNK_CHARS):
                    text += block
                    if len(block) == CHUNK_CHARS and (cut := cut_point(text)):  # a shorter block ends the file
                        yield (n, False), text[:cut]
                        text = text[cut:]
                yield (n, True), text
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None


worker_tokenizer = None  # in a worker process: the tokenizer it encodes with


def start_worker(tokenizer):
    global worker_tokenizer
    worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then ends the workers


def encode_piece(text, tokenizer=None):
    """text -> (its ids as uint16, its size in bytes), with tokenizer or else the worker's."""
    ids = (tokenizer or worker_tokenizer).encode(text)
    return np.array(ids, dtype=np.uint16), len(text.encode())  # 16 bits hold GPT-2's 50,257 ids


def encode_in_order(tokenizer, pieces, workers):
    """(tag, encode_piece(text)) for each (tag, text) of pieces, in order. With workers > 1 that many
    processes encode, each a piece at a time, and at most 2 x workers pieces are read ahead (threads,
    though tiktoken lets go of the GIL, scaled half as well: 16 reached 4x one, 16 processes 9x);
    with 1, this process encodes."""
    if workers == 1:
        for tag, text in pieces:
            yield tag, encode_piece(text, tokenizer)
        return
    with ProcessPoolExecutor(workers, initializer=start_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for tag, text in pieces:
            pending.append((tag, pool.submit(encode_piece, text)))
            if len(pending) > 2 * workers:
                tag, future = pending.popleft()
                yield tag, future.result()
        for tag, future in pending:
            yield tag, future.result()


def shard_path(cache, i):
    return os.path.join(cache, f"shard_{i:05d}.bin")


class ShardWriter:
    """Appends token ids to a cache's shards, SHARD_TOKENS to a file; `sizes`: the tokens in the shards kept."""

    def __init__(self, cache, sizes):
        self.cache, self.sizes = cache, sizes

    def write(self, ids):
        while len(ids):
            new = not self.sizes or self.sizes[-1] >= SHARD_TOKENS
            if new:
                self.sizes.append(0)
            n = min(len(ids), SHARD_TOKENS - self.sizes[-1])
            with open(shard_path(self.cache, len(self.sizes) - 1), "wb" if new else "ab") as f:
                ids[:n].tofile(f)
            self.sizes[-1] += n
            ids = ids[n:]


class Tokens:
    """The ids in a cache's shards as one sequence, memory-mapped: tokens[a:b] reads just those from disk."""

    def __init__(self, cache, sizes):
        self.shards = [np.memmap(shard_path(cache, i), dtype=np.uint16, mode="r", shape=(n,)) for i, n in enumerate(sizes)]
        self.starts = np.cumsum([0, *sizes]).tolist()  # where each shard begins in the sequence

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, s):
        begin, end, _ = s.indices(len(self))
        parts, i = [], bisect.bisect_right(self.starts, begin) - 1
        while begin < end:  # a window may run over from one shard into the next
            take = min(end, self.starts[i + 1])
            parts.append(self.shards[i][begin - self.starts[i]:take - self.starts[i]])
            begin, i = take, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def unchanged_files(manifest, sources):
    """How many of the first files are as the manifest recorded them: same path, size and modification time."""
    if not manifest or manifest["separator"] != sources["separator"]:
        return 0
    n = 0
    for old, new in zip(manifest["files"], sources["files"]):
        if any(old[k] != new[k] for k in ("path", "bytes", "mtime_ns")):
            break
        n += 1
    return n


def prepare(files, sources, cache, old, keep, tokenizer, workers):
    """Tokenize files[keep:] into the cache's shards after the tokens of files[:keep] (recorded in the old
    manifest), then write the manifest -> the manifest."""
    counts = [f["tokens"] for f in old["files"][:keep]] if keep else []  # each file's tokens
    kept, sizes = sum(counts), []
    for n in old["shards"] if keep else []:  # the shards holding the kept tokens, the last one cut to them
        if sum(sizes) == kept:
            break
        sizes.append(min(n, kept - sum(sizes)))
    try:
        os.makedirs(cache, exist_ok=True)
        if os.path.exists(os.path.join(cache, "manifest.json")):
            os.remove(os.path.join(cache, "manifest.json"))  # shards without a manifest are never trusted
        if sizes:
            os.truncate(shard_path(cache, len(sizes) - 1), 2 * sizes[-1])
    except OSError as e:
        raise UserError(f"cannot write the token cache {cache} ({e.strerror}): put --data in a folder you can write") from None

    counts += [0] * (len(files) - keep)
    writer, eot = ShardWriter(cache, sizes), np.array([tokenizer.eot_id], dtype=np.uint16)
    t0, total = time.time(), sum(f["bytes"] for f in sources["files"][keep:])
    workers = min(workers, 1 + total // CHUNK_CHARS)  # no more than there are pieces: one file of 20 kB needs none
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", delay=1) as bar:
        for (n, last), (ids, size) in encode_in_order(tokenizer, read_pieces(files[keep:]), workers):
            writer.write(ids)
            counts[keep + n] += len(ids)
            if last and sources["separator"]:
                writer.write(eot)
                counts[keep + n] += 1
            bar.update(size)
    for stale in set(glob(os.path.join(cache, "shard_*.bin"))) - {shard_path(cache, i) for i in range(len(writer.sizes))}:
        os.remove(stale)  # a shard of an earlier, longer corpus
    manifest = {**sources, "files": [{**f, "tokens": c} for f, c in zip(sources["files"], counts)],
                "shards": writer.sizes, "tokens": sum(counts)}
    write_json(manifest, os.path.join(cache, "manifest.json"))
    dt, new = time.time() - t0, sum(counts) - kept
    print(f"tokenized {len(files) - keep} of {len(files)} file(s), {total / 1e6:,.1f} MB, into {new:,} tokens in {dt:.1f} s "
          f"({new / max(dt, 1e-9):,.0f} tokens/s, {workers} worker(s)): {cache}")
    return manifest


def load_tokens(path, tokenizer, workers=WORKERS):
    """All of path's text as GPT-2 token ids (Tokens: read lazily), each document of a folder followed
    by <|endoftext|>. They are cached in <path>.tokens/: shards of uint16 and manifest.json, which
    records each file's size and modification time, so that changed or added files are tokenized again."""
    files, cache = text_files(path), os.path.normpath(path) + ".tokens"
    root = path if os.path.isdir(path) else os.path.dirname(path)
    stats = [(os.path.relpath(f, root), os.stat(f)) for f in files]
    sources = {"separator": os.path.isdir(path),  # a folder's documents end with <|endoftext|>, a single file does not
               "files": [{"path": p, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in stats]}
    try:
        with open(os.path.join(cache, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    keep = unchanged_files(manifest, sources)
    if keep < len(files) or len(manifest["files"]) != len(files):
        manifest = prepare(files, sources, cache, manifest, keep, tokenizer, workers)
    return Tokens(cache, manifest["shards"])
