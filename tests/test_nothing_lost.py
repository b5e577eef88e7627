"""Nothing lost when two runs meet, the disk fills, the judge is stopped or a flag is absurd: each case one
line (or a clean exit 130), the files that were there kept."""

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler

import pytest
import torch

import corpus
from tests.helpers import (INSTRUCT_TINY, ROOT, SPAM_TINY, TRAIN_TINY, one_line_error, reply,
                           snapshot, spam_sample, train_verdict)


def holding_the_lock(folder):
    """A process that holds folder's out-dir lock until it is killed."""
    code = (f"import files, time; files.lock_out_dir({str(folder)!r}); print('held', flush=True); "
            "time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_a_fine_tuning_run_into_a_busy_out_dir_is_refused(tmp_path, run_main):
    spam_sample(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "classifier.pt").write_bytes(b"the running one's")
    other = holding_the_lock(tmp_path / "out")
    try:
        line = one_line_error(run_main("finetune_spam.py", "--data", tmp_path / "sample.tsv", "--split-dir",
                                       tmp_path / "split", *SPAM_TINY, "--out-dir", tmp_path / "out",
                                       "--overwrite"))
        assert f"is in use by a run that has not ended (process {other.pid})" in line
        assert (tmp_path / "out" / "classifier.pt").read_bytes() == b"the running one's"
        assert not (tmp_path / "split").exists()
    finally:
        other.kill()


def test_another_split_in_the_same_split_dir_needs_overwrite(tmp_path, run_main):
    spam_sample(tmp_path)
    args = ["--split-dir", tmp_path / "split", *SPAM_TINY, "--max-iters", 1, "--eval-batches", 1]
    assert run_main("finetune_spam.py", "--data", tmp_path / "sample.tsv", *args, "--out-dir",
                    tmp_path / "a").returncode == 0
    before = snapshot(tmp_path / "split")
    lines = (tmp_path / "sample.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "other.tsv").write_text("".join(lines[1:]), encoding="utf-8")
    line = one_line_error(run_main("finetune_spam.py", "--data", tmp_path / "other.tsv", *args, "--out-dir",
                                   tmp_path / "b"))
    assert "holds another split (of other --data): pass --overwrite" in line
    assert snapshot(tmp_path / "split") == before


def test_a_folder_a_pipe_or_a_device_as_data_is_named_so(tmp_path, run_main):
    os.mkfifo(tmp_path / "fifo")
    for data in (tmp_path / "fifo", "/dev/null"):
        line = one_line_error(run_main("train.py", "--data", data, *TRAIN_TINY, "--out-dir", tmp_path / "o"))
        assert "is not a regular file (a device, a pipe or a socket)" in line
    line = one_line_error(run_main("finetune_spam.py", "--data", tmp_path, *SPAM_TINY, "--out-dir",
                                   tmp_path / "o"))
    assert "is a folder: --data takes the SMSSpamCollection file itself" in line


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_earlier_one(tmp_path, run_main, monkeypatch):
    data, out = train_verdict(tmp_path), tmp_path / "out"
    args = ["--data", data, *TRAIN_TINY, "--out-dir", out, "--eval-interval", 2]
    assert run_main("train.py", *args, "--max-iters", 2).returncode == 0
    before = snapshot(out)

    def full(obj, path):  # what torch.save says when the disk fills (seen on a 1 MB tmpfs)
        open(path, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    line = one_line_error(run_main("train.py", *args, "--max-iters", 4, "--resume"))
    assert "cannot write " in line and "PytorchStreamWriter failed writing file" in line
    assert "MB free; free some space (the file there before is kept)" in line
    assert snapshot(out) == before  # no half file, nothing replaced


def test_a_full_disk_while_tokenizing_leaves_no_shard_behind(tmp_path, run_main, monkeypatch):
    data = train_verdict(tmp_path)

    def full(self, ids):
        self.sizes.append(0)
        self.start(0)
        open(self.temporary(0), "ab").write(b"half")
        raise OSError("180668 requested and 51200 written")  # numpy's tofile on a full disk

    monkeypatch.setattr(corpus.ShardWriter, "write", full)
    line = one_line_error(run_main("train.py", "--data", data, "--prepare-only"))
    assert "cannot write the token cache" in line and "MB free; free some space" in line
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py", "tools/stress_resume.py"])
def test_a_seed_past_what_torch_takes_names_the_flag(script, tmp_path, run_main):
    r = run_main(script, "--seed", "99999999999999999999999", "--out-dir", tmp_path) if script == "train.py" \
        else run_main(script, "--seed", "99999999999999999999999")
    assert r.returncode == 2 and r.stderr.startswith("error: argument --seed: must be an integer from 0 to ")


@pytest.mark.parametrize("flag", ["--n-layer", "--reps", "--new-tokens", "--warmup"])
def test_bench_sizes_below_their_range_are_bad_flags(flag, run_main):
    r = run_main("bench.py", flag, "-1")
    assert r.returncode == 2 and r.stderr.startswith(f"error: argument {flag}: must be an integer >= ")


def test_a_window_no_corpus_can_fill_is_refused_before_the_model_is_made(tmp_path, run_main):
    t0 = time.time()
    line = one_line_error(run_main("train.py", "--data", train_verdict(tmp_path), "--n-layer", 1, "--n-head",
                                   2, "--n-embd", 32, "--context-length", 100_000_000, "--out-dir",
                                   tmp_path / "o"))
    assert "is too short" in line and time.time() - t0 < 30  # no 12.8 GB position table first


def test_a_lora_rank_past_the_width_is_refused(tmp_path, run_main):
    line = one_line_error(run_main("finetune_instruct.py", *INSTRUCT_TINY, "--lora-rank", 1_000_000,
                                   "--out-dir", tmp_path / "o"))
    assert "--lora-rank 1000000 is above the model's width 64" in line


def test_a_longer_window_than_the_models_says_what_to_pass(tmp_path, run_main):
    data = train_verdict(tmp_path)
    assert run_main("train.py", "--data", data, *TRAIN_TINY, "--out-dir", tmp_path / "a",
                    "--max-iters", 1).returncode == 0
    # no --context-length: the model's own 32, not the book's 256
    r = run_main("train.py", "--data", data, "--init-from", tmp_path / "a" / "best.pt", "--out-dir",
                 tmp_path / "b", "--max-iters", 1)
    assert r.returncode == 0 and "windows of 32" in r.stdout, r.stderr[-2000:]
    line = one_line_error(run_main("train.py", "--data", data, "--init-from", tmp_path / "a" / "best.pt",
                                   "--context-length", 64, "--out-dir", tmp_path / "c"))
    assert "--context-length 64 is longer than" in line and "pass --context-length 32 or less" in line


def test_printing_a_long_sample_decodes_each_token_once(capsys):
    from gpt2 import Tokenizer
    from sample import print_as_generated

    tok, decoded = Tokenizer(), []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)

    text = "Café au lait, 東京 and 🤖 robots. " * 50
    ids = tok.encode(text)
    print_as_generated(iter(ids), Counting())
    assert capsys.readouterr().out == text + "\n"
    assert sum(decoded) <= 2 * len(ids) + 1  # linear: each token decoded about once, not the text so far


# -----------------------------------------------------------------------------
# The judge keeps every score it was given.


class SlowJudge(BaseHTTPRequestHandler):
    """Answers "70" to the first server.answers requests, then server.then: "drop" closes the connection,
    "hang" waits until the test is over."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.count += 1
        if self.server.count > self.server.answers:
            if self.server.then == "hang":
                time.sleep(60)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        reply(self, json.dumps({"message": {"role": "assistant", "content": "70"}, "done": True}).encode(),
              content_type="application/json")

    def log_message(self, *args):
        pass


def responses(tmp_path, n=5):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}.",
                                 "model_response": f"answer {i}"} for i in range(n)]))
    return path


def test_a_judge_that_drops_the_connection_keeps_the_scores_it_gave(tmp_path, serve, run_main):
    path = responses(tmp_path)
    server = serve(SlowJudge, count=0, answers=2, then="drop")
    r = run_main("finetune_instruct.py", "--judge", path, "--ollama-url", server.url)
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(err) == 1
    assert "closed the connection before it answered" in err[0]
    assert [e.get("score") for e in json.loads(path.read_text())] == [70, 70, None, None, None]
    server.answers, server.count = 10, 0  # a run again scores only what is left
    r = run_main("finetune_instruct.py", "--judge", path, "--ollama-url", server.url)
    assert r.returncode == 0 and server.count == 3, r.stderr
    assert [e["score"] for e in json.loads(path.read_text())] == [70] * 5


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm from a script's &"])
def test_a_stopped_judge_keeps_the_scores_it_gave(tmp_path, serve, how):
    path = responses(tmp_path)
    server = serve(SlowJudge, count=0, answers=2, then="hang")
    command = [sys.executable, str(ROOT / "finetune_instruct.py"), "--judge", str(path), "--ollama-url",
               server.url]
    if how == "ctrl-c":
        p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:  # a shell script's `cmd &` starts it ignoring SIGINT: SIGTERM must stop it all the same
        p = subprocess.Popen(["bash", "-c", " ".join(f"'{c}'" for c in command) + " & wait"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while server.count < 3 and time.time() < deadline:
        time.sleep(0.05)
    if how == "ctrl-c":
        p.send_signal(signal.SIGINT)
    else:
        os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 if how == "ctrl-c" else "interrupted" in err, err  # (bash's own code: -15)
    assert "Traceback" not in err and "2 new scores are kept" in out
    assert [e.get("score") for e in json.loads(path.read_text())] == [70, 70, None, None, None]


def test_a_second_judge_of_the_same_file_is_refused(tmp_path, serve, run_main):
    from filelock import FileLock

    path = responses(tmp_path, 1)
    held = FileLock(str(path) + ".lock")
    held.acquire()
    try:
        line = one_line_error(run_main("finetune_instruct.py", "--judge", path, "--ollama-url",
                                       "http://127.0.0.1:9"))
        assert "is being written by a run that has not ended" in line
    finally:
        held.release()


def test_every_missing_prerequisite_is_named_at_once(tmp_path, monkeypatch, run_main):
    monkeypatch.chdir(tmp_path)  # no models/, no data/
    line = one_line_error(run_main("finetune_spam.py", "--init-from", "gpt2"))
    assert "this run needs GPT-2 124M's weights in models/124M (python download_weights.py --model 124M)" \
           in line and "and data/sms-spam/SMSSpamCollection (downloaded on first use" in line
    line = one_line_error(run_main("finetune_instruct.py", "--data", "mine.json"))
    assert "GPT-2 355M's weights in models/355M" in line and "and --data mine.json (not found)" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["train.py", "sample.py", "finetune_spam.py"])
def test_ctrl_c_while_the_script_imports_torch_exits_130_without_a_traceback(script):
    """The first seconds of a run are imports (torch alone takes a second or more): a Ctrl-C then is a
    quiet stop, as it is once training runs."""
    p = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    # until torch's library is mapped: errors.py, imported first, is in, and torch is still importing (a
    # fixed 0.3 s was too short on a busy machine)
    deadline = time.monotonic() + 30
    while "libtorch" not in open(f"/proc/{p.pid}/maps").read():
        assert p.poll() is None and time.monotonic() < deadline, "the script never began to import torch"
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert out == "" and "usage:" not in out  # stopped before argparse could print --help
    assert (p.returncode, err) == (130, "interrupted\n")
