"""corpus.py: the token cache holds exactly tiktoken's tokens, follows the text, and is read lazily."""

import json
import os
import random
import time

import numpy as np
import tiktoken

from corpus import load_tokens
from gpt2 import Tokenizer
from tests.conftest import DATA, EOT, run_script


def test_train_token_cache_follows_the_text(tmp_path):
    enc = tiktoken.get_encoding("gpt2")
    f = tmp_path / "a.txt"
    f.write_text("Hello world, once.", encoding="utf-8")
    assert load_tokens(str(f), Tokenizer())[:].tolist() == enc.encode("Hello world, once.")
    cache = tmp_path / "a.txt.tokens"
    assert json.loads((cache / "manifest.json").read_text())["tokens"] == len(enc.encode("Hello world, once."))
    f.write_text("Something else entirely.", encoding="utf-8")
    assert load_tokens(str(f), Tokenizer())[:].tolist() == enc.encode("Something else entirely.")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "2.txt").write_text("second", encoding="utf-8")
    (folder / "1.txt").write_text("first", encoding="utf-8")
    (folder / "sub" / "3.txt").write_text("third, one folder down", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    expected = enc.encode("first") + [EOT] + enc.encode("second") + [EOT] + enc.encode("third, one folder down") + [EOT]
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == expected


DATA_ALPHABET = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "\u00a0", "\u3000", "a", "Bé", "1", "42", "'", "'s", "'ll",
                 "🙂", "中文", "ü", "-", ".", "<|endoftext|>", "word", "\u0301"]


def data_documents(folder):
    """Real text and adversarial text (whitespace runs, contractions, digits, multibyte characters,
    a literal <|endoftext|>) as a folder of documents, one in a subfolder -> their paths in sorted order."""
    rng = random.Random(0)
    (folder / "sub").mkdir(parents=True)
    docs = {folder / "a-shakespeare.txt": (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000],
            folder / "b-mixed.txt": "".join(rng.choice(DATA_ALPHABET) for _ in range(40_000)),
            folder / "sub" / "c-multibyte.txt": "".join(rng.choice(["é中🙂", "\n", " ", "ü", "文字"]) for _ in range(40_000)),
            folder / "d-one-word.txt": "x"}
    for path, text in docs.items():
        path.write_text(text, encoding="utf-8")
    return sorted(docs)


def data_expected(paths):
    """tiktoken's encoding of each whole document (read as train.py reads it), each followed by <|endoftext|>."""
    enc = tiktoken.get_encoding("gpt2")
    return [t for p in paths for t in enc.encode(p.read_text(encoding="utf-8"), allowed_special={"<|endoftext|>"}) + [EOT]]


def test_data_pieces_and_shards_hold_each_document_s_exact_tokens(tmp_path, monkeypatch):
    import corpus

    monkeypatch.setattr(corpus, "CHUNK_CHARS", 1000)  # hundreds of pieces, cut between multibyte characters
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 10_000)
    paths = data_documents(tmp_path / "docs")
    assert all(len(list(corpus.read_pieces([p]))) > 50 for p in paths if p.stat().st_size > 10_000)
    tokens = load_tokens(str(tmp_path / "docs"), Tokenizer(), workers=3)  # through 3 worker processes
    expected = data_expected(paths)
    assert len(tokens) == len(expected) and tokens[:].tolist() == expected
    assert tokens[9_990:10_020].tolist() == expected[9_990:10_020]  # across a shard boundary
    # The layout: raw uint16 shards of SHARD_TOKENS ids, in order, and the manifest's counts.
    manifest = json.loads((tmp_path / "docs.tokens" / "manifest.json").read_text())
    shards = sorted((tmp_path / "docs.tokens").glob("shard_*.bin"))
    assert [f["path"] for f in manifest["files"]] == [str(p.relative_to(tmp_path / "docs")) for p in paths]
    assert [f["tokens"] for f in manifest["files"]] == [len(data_expected([p])) for p in paths]
    assert manifest["shards"] == [10_000] * (len(expected) // 10_000) + [len(expected) % 10_000] == [
        len(np.memmap(s, dtype=np.uint16, mode="r")) for s in shards]
    assert np.concatenate([np.memmap(s, dtype=np.uint16, mode="r") for s in shards]).tolist() == expected


class CountingTokenizer(Tokenizer):  # counts only in this process: workers=1
    def __init__(self):
        super().__init__()
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        return super().encode(text)


def test_data_manifest_notices_changed_and_added_files_and_keeps_the_rest(tmp_path, monkeypatch):
    import corpus

    monkeypatch.setattr(corpus, "SHARD_TOKENS", 5_000)
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    load_tokens(str(folder), Tokenizer())
    tok = CountingTokenizer()
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths) and tok.texts == []  # nothing changed

    paths[2].write_text(paths[2].read_text(encoding="utf-8")[:-1] + "!", encoding="utf-8")  # same size, new content
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))  # as an editor leaves it, even on coarse clocks
    tok = CountingTokenizer()
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths)
    tokenized = "".join(tok.texts)
    assert tokenized == paths[2].read_text(encoding="utf-8") + paths[3].read_text(encoding="utf-8")  # from the changed file on

    (folder / "z-added.txt").write_text("A new document.", encoding="utf-8")
    paths.append(folder / "z-added.txt")  # sorts last: only it is tokenized
    tok = CountingTokenizer()
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths) and tok.texts == ["A new document."]

    paths.pop(0).unlink()  # a removed file: everything after it again, no stale shard left
    tokens = load_tokens(str(folder), Tokenizer())
    assert tokens[:].tolist() == data_expected(paths)
    assert len(list((tmp_path / "docs.tokens").glob("shard_*.bin"))) == len(tokens.shards) == -(-len(tokens) // 5_000)


def test_data_prepare_only_prints_the_count_and_trains_from_it(tmp_path):
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    r = run_script("train.py", "--data", folder, "--prepare-only", "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{len(data_expected(paths)):,} tokens"
    assert "tokenized 4 of 4 file(s)" in r.stdout and not (tmp_path / "out").exists()
    r = run_script("train.py", "--data", folder, "--prepare-only")
    assert r.returncode == 0 and "tokenized" not in r.stdout  # the cache is up to date


