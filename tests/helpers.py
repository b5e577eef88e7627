"""What the tests share: where the real data is, tiny models and their transformers twin, OpenAI-layout
checkpoints written with TensorFlow, running a script as a user would (run_script) or in this process
(run_in_process), a reply of a local HTTP server, a fake Ollama judge, and the checks of bad input: one
line, no traceback, the files that were there left as they were. The fixtures (run_main, serve) are in
conftest.py."""

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from gpt2 import GPT, GPTConfig, KVCache
from launcher import free_port  # noqa: F401 (the tests' too: a port nobody listened on a moment ago)

ROOT = Path(__file__).resolve().parent.parent  # the project
DATA = Path(os.environ["GPT2_DATA"])  # the real data, where the project's conftest.py found it
OPENAI_124M = DATA / "gpt2-124M"  # the real index and hparams of OpenAI's 124M release, without the weights
EOT = 50256  # <|endoftext|>, as tiktoken numbers it
LOCK_FILES = {".lock", ".lock.pid"}  # files.lock_out_dir's

# -----------------------------------------------------------------------------
# Tiny models, and the same weights in transformers' GPT-2 and in OpenAI's TensorFlow layout.

TINY = dict(vocab_size=96, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
# The tests that import TensorFlow (9 s of a core) run in one of xdist's processes, not in each.
TENSORFLOW = pytest.mark.xdist_group("tensorflow")


def hf_twin(model):
    """transformers' GPT2LMHeadModel holding exactly `model`'s weights (its Conv1D layers keep them (in,
    out))."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    c = model.config
    with torch.device("meta"):  # no random weights to draw (3 s for 124M): each is given below
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        ))
    conv1d = {f"{name}.weight" for name, module in hf.named_modules() if isinstance(module, Conv1D)}
    state = {k: (v.t() if k in conv1d else v).contiguous().clone() for k, v in model.state_dict().items()}
    # strict=False: transformers keeps no copy of the tied lm_head, which tie_weights points at wte again
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    assert not any(p.is_meta for p in hf.parameters())
    return hf.eval()


def tiny_model(seed=0, **overrides):
    """A small GPT with weights far from their initial scale, so that every part of the
    model (each head, each mask entry) moves the logits enough to change greedy choices."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def real_index():
    import tensorflow as tf

    return {name: tuple(shape) for name, shape in tf.train.list_variables(str(OPENAI_124M / "model.ckpt"))}


def write_openai_checkpoint(folder, hf, n_ctx, tweak=None):
    """Write hf's weights as OpenAI did: TensorFlow variables named like the real index,
    linear layers as (1, in, out) convolutions. Uses transformers' names, not ours."""
    import tensorflow as tf

    state = hf.state_dict()
    n_layer = hf.config.n_layer
    variables = {}
    for name in real_index():  # model/h0/attn/c_attn/w, model/ln_f/g, ...
        parts = name.split("/")[1:]
        if parts[0].startswith("h") and int(parts[0][1:]) >= n_layer:
            continue
        if parts[0].startswith("h"):
            parts[0] = f"h.{parts[0][1:]}"
        leaf = {"w": "weight", "g": "weight", "b": "bias"}.get(parts[-1])
        key = "transformer." + ".".join(parts[:-1] + [leaf] if leaf else parts + ["weight"])
        array = state[key].numpy()
        variables[name] = array[None] if parts[-1] == "w" else array  # Conv1D (in, out) -> (1, in, out)
    if tweak:
        tweak(variables)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[tf.constant(variables[n]) for n in names])
    c = hf.config
    hparams = {"n_vocab": c.vocab_size, "n_ctx": n_ctx, "n_embd": c.n_embd, "n_head": c.n_head,
               "n_layer": n_layer}
    (folder / "hparams.json").write_text(json.dumps(hparams))
    return folder


def generate_without_cache(model, idx, n, temperature=1.0):
    """The textbook loop: rerun the whole sequence, cropped to the last n_ctx tokens, for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.n_ctx:])
        idx = torch.cat([idx, GPT.sample_next(logits[:, -1], temperature)], dim=1)
    return idx


def cached_logits(model, idx):
    """The logits of idx (B, 20) run through the KV cache in pieces: a prompt, single tokens, then a chunk."""
    caches = [KVCache(idx.size(0), model.config.n_ctx, model.config, "cpu", torch.float32)
              for _ in range(model.config.n_layer)]
    pieces = [(0, 5), *((t, t + 1) for t in range(5, 12)), (12, 20)]
    with torch.no_grad():
        return torch.cat([model.lm_head(model.hidden_states(idx[:, a:b], caches)) for a, b in pieces], dim=1)


def ragged_prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


# -----------------------------------------------------------------------------
# Running the scripts.


def run_script(name, *args, cwd=ROOT, env=None, timeout=300, launcher=(sys.executable,)):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


def run_in_process(script, *args, cwd=None, env=None):
    """The script's main() in this process (in folder cwd, with the variables env adds), as `python script
    args` runs it but without starting a new interpreter -> a CompletedProcess, as run_script gives. The
    run_main fixture's, for fixtures that outlive a test."""
    import errors
    import files

    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with (pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out),
              contextlib.redirect_stderr(err)):
            m.setattr(sys, "argv", [script, *map(str, args)])
            for name, value in (env or {}).items():
                m.setenv(name, value)
            if cwd is not None:
                m.chdir(cwd)
            errors.run(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)  # (errors.run makes SIGTERM a Ctrl-C)
        torch.set_num_threads(threads)  # (a script may set its own)
        for lock in files.LOCKS:  # a process runs one script: its out-dir locks go when it ends
            lock.release()
        files.LOCKS.clear()
        for folder in files.LOCKED:
            files.remove_if_unused(folder)
        files.LOCKED.clear()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def reply(handler, body, status=200, content_type="application/octet-stream"):
    """Answer the request an HTTP handler holds with body (bytes) and status."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class FakeOllama(BaseHTTPRequestHandler):
    """POST /api/chat -> {"message": {"role": "assistant", "content": next reply}, "done": true};
    a model other than the server's gets Ollama's 404 {"error": "model '...' not found"}."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((self.path, body))
        if body["model"] != server.model:
            status, answer = 404, {"error": f"model '{body['model']}' not found"}
        else:
            status, answer = 200, {"model": server.model, "done": True,
                                   "message": {"role": "assistant", "content": server.replies.pop(0)}}
        reply(self, json.dumps(answer).encode(), status, "application/json")

    def log_message(self, *args):
        pass


# Off the happy path: every bad input is one line (exit 1; 2 for a flag argparse rejects), no
# traceback, and the files that were there before are byte-identical afterwards.


def one_line_error(r, code=1):
    """The single 'error: ...' line of a run that must have failed cleanly."""
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-3000:]
    # less progress bars
    lines = [line for line in r.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def snapshot(folder):
    """Every file under folder and its bytes, less the lock a run holds on its out-dir."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file() and p.name not in LOCK_FILES}


def stop_then_resume(script, args, straight, stopped, run_main, cwd=ROOT):
    """Run `script args` into the out-dir straight, then again into stopped, Ctrl-C'd once its first best
    model is saved (at the evaluation of step 0, or of the first step --eval-interval gives) and resumed
    with --resume -> (the two final ckpt.pt, the step it stopped at, its stdout). The stopped run is a
    process of its own (it gets the signal); the other two run in this one (run_main)."""
    r = run_main(script, *args, "--out-dir", straight, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args), "--out-dir", str(stopped)],
                         cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((Path(cwd) / stopped).glob("*.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    stopped_at = torch.load(Path(cwd) / stopped / "ckpt.pt", weights_only=True)["step"]
    r = run_main(script, *args, "--out-dir", stopped, "--resume", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(Path(cwd) / folder / "ckpt.pt", weights_only=True) for folder in (straight, stopped))
    return a, b, stopped_at, stdout


def assert_bitwise_equal(a, b):
    """Two ckpt.pt: the same step, weights, optimizer state and history, bit for bit."""
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    assert a["history"] == b["history"]


# -----------------------------------------------------------------------------
# Tiny runs of each script on the real data.

TRAIN_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--context-length", "32"]


def train_verdict(tmp_path):
    """A copy of the real the-verdict.txt in tmp_path (its token cache is written beside it)."""
    return shutil.copy(DATA / "the-verdict.txt", tmp_path / "the-verdict.txt")


def train_args(data, out, *args):
    return ["--data", data, "--out-dir", out, *TRAIN_TINY, *args]


def train_run(data, out, *args, launcher=(sys.executable,)):
    r = run_script("train.py", *train_args(data, out, *args), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


SPAM_DATA = DATA / "sms-spam" / "SMSSpamCollection"
SPAM_TINY = ["--init-from", "scratch", "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
             "--context-length", "300"]


def spam_sample(folder):
    """folder/sample.tsv: the real file's first 60 ham and first 60 spam lines."""
    lines = SPAM_DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    sample = ([l for l in lines if l.startswith("ham\t")][:60]
              + [l for l in lines if l.startswith("spam\t")][:60])
    (folder / "sample.tsv").write_text("".join(sample), encoding="utf-8")


INSTRUCT_DATA = DATA / "instruction-data.json"
INSTRUCT_TINY = ("--init-from", "scratch", "--n-layer", 2, "--n-head", 4, "--n-embd", 64,
                 "--data", INSTRUCT_DATA, "--batch-size", 4, "--eval-batches", 1, "--max-new-tokens", 3,
                 "--lr", 1e-3)
SAMPLE_PROMPT = "Every effort moves you"
