"""corpus.py: the token cache holds exactly tiktoken's tokens, follows the text, and is read lazily."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken

from corpus import load_tokens
from gpt2 import Tokenizer
from tests.helpers import DATA, EOT, ROOT, TRAIN_TINY, one_line_error, run_script, snapshot


def test_train_token_cache_follows_the_text(tmp_path):
    enc = tiktoken.get_encoding("gpt2")
    f = tmp_path / "a.txt"
    f.write_text("Hello world, once.", encoding="utf-8")
    assert load_tokens(str(f), Tokenizer())[:].tolist() == enc.encode("Hello world, once.")
    cache = tmp_path / "a.txt.tokens"
    assert json.loads((cache / "manifest.json").read_text())["tokens"] \
           == len(enc.encode("Hello world, once."))
    f.write_text("Something else entirely.", encoding="utf-8")
    assert load_tokens(str(f), Tokenizer())[:].tolist() == enc.encode("Something else entirely.")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "2.txt").write_text("second", encoding="utf-8")
    (folder / "1.txt").write_text("first", encoding="utf-8")
    (folder / "sub" / "3.txt").write_text("third, one folder down", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    expected = (enc.encode("first") + [EOT] + enc.encode("second") + [EOT]
                + enc.encode("third, one folder down") + [EOT])
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == expected


DATA_ALPHABET = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "\u00a0", "\u3000", "a", "Bé", "1", "42", "'",
                 "'s", "'ll", "🙂", "中文", "ü", "-", ".", "<|endoftext|>", "word", "\u0301"]


def data_documents(folder):
    """Real text and adversarial text (whitespace runs, contractions, digits, multibyte characters,
    a literal <|endoftext|>) as a folder of documents, one in a subfolder -> their paths in sorted order."""
    rng = random.Random(0)
    (folder / "sub").mkdir(parents=True)
    docs = {folder / "a-shakespeare.txt":
                (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000],
            folder / "b-mixed.txt": "".join(rng.choice(DATA_ALPHABET) for _ in range(40_000)),
            folder / "sub" / "c-multibyte.txt": "".join(rng.choice(["é中🙂", "\n", " ", "ü", "文字"])
                                                        for _ in range(40_000)),
            folder / "d-one-word.txt": "x"}
    for path, text in docs.items():
        path.write_text(text, encoding="utf-8")
    return sorted(docs)


def data_expected(paths):
    """tiktoken's encoding of each whole document (read as train.py reads it), each followed by
    <|endoftext|>."""
    enc = tiktoken.get_encoding("gpt2")
    return [t for p in paths
            for t in enc.encode(p.read_text(encoding="utf-8"), allowed_special={"<|endoftext|>"}) + [EOT]]


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
    # nothing changed
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths) and tok.texts == []

    # same size, new content
    paths[2].write_text(paths[2].read_text(encoding="utf-8")[:-1] + "!", encoding="utf-8")
    # as an editor leaves it, even on coarse clocks
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    tok = CountingTokenizer()
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths)
    tokenized = "".join(tok.texts)
    # from the changed file on
    assert tokenized == paths[2].read_text(encoding="utf-8") + paths[3].read_text(encoding="utf-8")

    (folder / "z-added.txt").write_text("A new document.", encoding="utf-8")
    paths.append(folder / "z-added.txt")  # sorts last: only it is tokenized
    tok = CountingTokenizer()
    assert load_tokens(str(folder), tok, workers=1)[:].tolist() == data_expected(paths) \
           and tok.texts == ["A new document."]

    paths.pop(0).unlink()  # a removed file: everything after it again, no stale shard left
    tokens = load_tokens(str(folder), Tokenizer())
    assert tokens[:].tolist() == data_expected(paths)
    assert len(list((tmp_path / "docs.tokens").glob("shard_*.bin"))) == len(tokens.shards) \
           == -(-len(tokens) // 5_000)


def test_data_prepare_only_prints_the_count_and_trains_from_it(tmp_path, run_main):
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    r = run_main("train.py", "--data", folder, "--prepare-only", "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{len(data_expected(paths)):,} tokens"
    assert "tokenized 4 of 4 file(s)" in r.stdout and not (tmp_path / "out").exists()
    r = run_main("train.py", "--data", folder, "--prepare-only")
    assert r.returncode == 0 and "tokenized" not in r.stdout  # the cache is up to date




# -----------------------------------------------------------------------------
# Off the happy path: several processes, links, kills, damaged caches. Each ends with the cache's
# tokens exactly a clean preparation's, and no worker process left.


def shakespeare_corpus(folder, copies):
    """folder holding `copies` files of Tiny Shakespeare (1.1 MB each) -> the folder."""
    folder.mkdir()
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for i in range(copies):
        (folder / f"part-{i:02d}.txt").write_text(f"{i}\n" + text, encoding="utf-8")
    return folder


def clean_tokens(folder, tmp_path):
    """The shards' ids of a preparation of a copy of folder alone, by one process."""
    copy = tmp_path / "clean" / folder.name
    shutil.copytree(folder, copy, symlinks=True)
    return load_tokens(str(copy), Tokenizer(), workers=1)[:]


def prepare_only(folder, *args):
    return [sys.executable, str(ROOT / "train.py"), "--data", str(folder), "--prepare-only", *map(str, args)]


def children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []


def running(pid):
    """Whether pid is a process that still runs (not gone, nor a zombie)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "waited in vain"
        time.sleep(0.02)


def test_bad_two_preparations_at_once_make_one_cache(tmp_path):
    """Class 1: two --prepare-only (or training runs) of one corpus at once: one prepares, the other waits for
    it and reads its cache; neither ever writes into shards the other reads. (The test holds the lock while
    both start, so that they meet for sure.)"""
    import corpus

    folder = shakespeare_corpus(tmp_path / "corpus", 6)
    with corpus.cache_lock(str(tmp_path / "corpus.tokens"), exclusive=True):
        runs = [subprocess.Popen(prepare_only(folder, "--workers", 2), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        # held until both say they wait: each one's first line (read as it comes; however slow the start)
        waited = [p.stderr.readline() for p in runs]
        assert all("waiting for another process to finish preparing" in line for line in waited), waited
        assert all(p.poll() is None for p in runs)  # both wait
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    expected = clean_tokens(folder, tmp_path)
    assert all(out.strip().splitlines()[-1] == f"{len(expected):,} tokens" for out, _ in outs)
    assert sum("tokenized" in out for out, _ in outs) == 1  # one preparation; the other read its cache
    assert np.array_equal(load_tokens(str(folder), Tokenizer())[:], expected)
    assert not list((tmp_path / "corpus.tokens").glob("*.tmp"))


def test_bad_links_to_folders_are_not_followed(tmp_path, run_main):
    """Class 2: links that loop back up (one, or two that lead into each other) neither repeat the files nor
    hang; a link to a file is read; a link to nothing is one line."""
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "sub" / "up").symlink_to(folder / "sub", target_is_directory=True)
    (folder / "sub" / "back").symlink_to(folder, target_is_directory=True)
    r = run_main("train.py", "--data", folder, "--prepare-only")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == f"{len(data_expected(paths)):,} tokens"
    assert "links to folders are not followed: " in r.stderr and "loop" in r.stderr
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == data_expected(paths)
    (folder / "z-link.txt").symlink_to(paths[-1])  # a link to a file: its text once more, as a document
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == data_expected([*paths, paths[-1]])
    (folder / "z-link.txt").unlink()
    (folder / "z-link.txt").symlink_to(folder / "gone.txt")
    before = snapshot(tmp_path)
    line = one_line_error(run_main("train.py", "--data", folder, "--prepare-only"))
    assert f"{folder / 'z-link.txt'} is a link to nothing" in line and snapshot(tmp_path) == before


def test_bad_killed_preparation_leaves_no_worker_and_a_whole_cache(tmp_path):
    """Class 7: SIGTERM to a --prepare-only with workers ends it and its workers at once (exit 130, one line);
    SIGKILL leaves workers that notice their parent is gone and end; the next preparation is whole."""
    folder = shakespeare_corpus(tmp_path / "corpus", 12)
    for kill in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen(prepare_only(folder, "--workers", 2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(children(p.pid)) >= 2)
        workers = children(p.pid)
        p.send_signal(kill)
        _, err = p.communicate(timeout=60)
        if kill == signal.SIGTERM:
            assert p.returncode == 130 and "Traceback" not in err \
                   and err.strip().splitlines()[-1] == "interrupted", err
        wait_for(lambda: not any(running(w) for w in workers), seconds=10)
    r = subprocess.run(prepare_only(folder), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(load_tokens(str(folder), Tokenizer())[:], clean_tokens(folder, tmp_path))


@pytest.mark.parametrize("damage", ["wrong shape", "a list", "a string", "an entry without bytes",
                                    "a shard cut short", "a shard missing"])
def test_bad_damaged_cache_is_rebuilt_with_one_line(tmp_path, damage, run_main):
    """Classes 11 and 12: a manifest that is valid JSON of the wrong shape, or shards that are not what
    it says: the cache is prepared again, with one line that says so, and holds tiktoken's tokens again."""
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    load_tokens(str(folder), Tokenizer())
    cache = tmp_path / "docs.tokens"
    manifest = json.loads((cache / "manifest.json").read_text())
    broken = {"wrong shape": {"separator": True}, "a list": [1, 2], "a string": "tokens",
              "an entry without bytes": {**manifest, "files": [{k: v for k, v in f.items() if k != "bytes"}
                                                               for f in manifest["files"]]}}
    if damage in broken:
        (cache / "manifest.json").write_text(json.dumps(broken[damage]))
    elif damage == "a shard cut short":
        os.truncate(cache / "shard_00000.bin", 1000)
    else:
        (cache / "shard_00000.bin").unlink()
    r = run_main("train.py", "--data", folder, "--prepare-only")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = [line for line in r.stderr.splitlines() if "%|" not in line]
    assert len(said) == 1 and said[0].startswith(f"the token cache {cache} is damaged (") \
           and "tokenizing again" in said[0]
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == data_expected(paths)


def test_bad_id_past_the_vocabulary_names_its_shard(tmp_path, run_main):
    """Class 6: a flipped bit in a shard (an id no tokenizer made) is one line naming the shard and the way
    out, where a window is read, not an IndexError deep in the embedding; nothing is written."""
    data = shutil.copy(DATA / "the-verdict.txt", tmp_path / "the-verdict.txt")
    load_tokens(str(data), Tokenizer())
    shard = tmp_path / "the-verdict.txt.tokens" / "shard_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[100] = 60000  # a bit flipped: 60,000 is no GPT-2 token
    ids.tofile(shard)
    before = snapshot(tmp_path)
    line = one_line_error(run_main("train.py", "--data", data, *TRAIN_TINY, "--out-dir", tmp_path / "out",
                                   "--eval-only", "--init-from", "scratch"))
    assert f"{shard} holds the id 60000, past the vocabulary's 50,257" in line
    assert f"delete {tmp_path / 'the-verdict.txt.tokens'} and run again" in line \
           and snapshot(tmp_path) == before


def test_a_run_reading_the_cache_keeps_its_tokens_while_another_prepares_it(tmp_path, monkeypatch):
    """A preparation writes new shards and renames them into place: a run that mapped the old ones goes on
    reading exactly the tokens it started with, the next one reads the new."""
    import corpus

    # many shards: the changed file's is copied, then added to
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 5_000)
    folder = tmp_path / "docs"
    paths = data_documents(folder)
    reading = load_tokens(str(folder), Tokenizer())
    old = data_expected(paths)
    paths[2].write_text("a new ending", encoding="utf-8")
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    # (its shards: 100M tokens each)
    r = run_script("train.py", "--data", folder, "--prepare-only", timeout=120)
    assert r.returncode == 0, r.stderr
    assert reading[:].tolist() == old and len(reading) == len(old)
    assert load_tokens(str(folder), Tokenizer())[:].tolist() == data_expected(paths)
