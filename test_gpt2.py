"""Tests against references nobody here wrote: tiktoken, Hugging Face transformers'
GPT-2, and OpenAI's own checkpoint index. Real data comes from ../shared/data."""

import csv
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from torch.nn import functional as F

import bench
import common
import download_weights
import explore
import finetune_spam as fs
from common import UserError, configure_optimizer, download, openai_tokenizer, save_atomic
from finetune_instruct import (
    IGNORE, JUDGE_RETRIES, LoRALinear, add_lora, collate, encode, load_entries, merge_lora, split,
)
from common import format_prompt
from gpt2 import GPT, GPTConfig, KVCache, Tokenizer, size_name
from train import load_tokens

ROOT = Path(__file__).resolve().parent  # the project
SHARED = ROOT.parent / "shared" / "data"  # real data, kept outside the project
ENV = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken-cache"), "PYTHONIOENCODING": "utf-8"}
OPENAI_124M = SHARED / "gpt2-124M"  # the real index and hparams, without the weights file
TINY = dict(vocab_size=96, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
LINEAR_LAYERS = ("c_attn", "c_proj", "c_fc")  # nn.Linear here, Conv1D (weights transposed) in transformers


def hf_twin(model):
    """transformers' GPT2LMHeadModel holding exactly `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    ))
    state = {k: v.t() if k.split(".")[-2] in LINEAR_LAYERS and k.endswith("weight") else v
             for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)  # strict=False: transformers keeps no copy of the tied lm_head
    return hf.eval()


def run_script(name, *args, cwd=ROOT, env=ENV, timeout=300, launcher=(sys.executable,)):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([*launcher, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(script, *args): the script's main() in this process, as `python script args` runs it
    but without starting a new interpreter -> a CompletedProcess, as run_script gives."""
    def run(script, *args):
        module = importlib.import_module(script.removesuffix(".py"))
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        try:
            common.run(module.main)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)
    return run


def free_port():
    """A port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    """serve(handler, **attributes) starts an HTTP server on 127.0.0.1 with those attributes and
    .url; every server started is shut down after the test."""
    servers = []

    def start(handler, **attributes):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.__dict__.update(attributes)
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def tiny_model(seed=0, **overrides):
    """A small GPT with weights far from their initial scale, so that every part of the
    model (each head, each mask entry) moves the logits enough to change greedy choices."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_known_ids_and_round_trip():
    tok = Tokenizer()
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.eot_id == 50256
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    for text in ["Ünïcödé – “quotes” ½ €", "日本語のテキスト", "emoji 🎉🚀 mixed", "  spaces\n\ttabs  ", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_from_openai_files_equals_tiktoken():
    """The encoding built from encoder.json equals tiktoken's: every token's bytes (the whole rank
    table), the special token, the pre-tokenizer pattern, and the ids of real text."""
    ours, reference = openai_tokenizer(OPENAI_124M), Tokenizer()
    for i in range(reference.enc.n_vocab - 1):
        assert ours.enc.decode_single_token_bytes(i) == reference.enc.decode_single_token_bytes(i), i
    assert ours.enc._special_tokens == reference.enc._special_tokens and ours.enc._pat_str == reference.enc._pat_str
    text = (SHARED / "the-verdict.txt").read_text(encoding="utf-8") + " 日本語 🎉 <|endoftext|> naïve\r\n"
    assert ours.encode(text) == reference.encode(text)
    assert ours.eot_id == reference.eot_id == 50256
    assert ours.enc.n_vocab == reference.enc.n_vocab == 50257
    assert ours.decode(ours.encode(text)) == text


# -----------------------------------------------------------------------------
# The model against transformers' GPT-2


@pytest.mark.parametrize("config", [TINY, {}], ids=["tiny", "124M"])
def test_logits_and_loss_equal_transformers(config):
    model = tiny_model(**config) if config else GPT(GPTConfig()).eval()
    hf = hf_twin(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
        reference = hf(idx, labels=idx)  # transformers shifts the labels itself
    assert logits.shape == (2, 47, model.config.vocab_size)
    torch.testing.assert_close(logits, reference.logits[:, :-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, reference.loss, atol=1e-5, rtol=0)
    assert model(idx)[1] is None


def test_written_out_attention_equals_the_fused_kernel():
    """attention() is the formula softmax(q kᵀ / √hs + mask) v; the model's fast path is PyTorch's fused
    kernel. Same logits either way, and the kept weights are causal rows that sum to 1."""
    model, idx = tiny_model(seed=2), torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        fused = model(idx)[0]
        for block in model.transformer.h:
            block.attn.keep_weights = True
        written = model(idx)[0]
    torch.testing.assert_close(written, fused, atol=1e-5, rtol=0)
    for block in model.transformer.h:
        w = block.attn.weights
        assert w.shape == (2, TINY["n_head"], 24, 24)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, TINY["n_head"], 24))
        causal = torch.ones(24, 24, dtype=torch.bool).tril()
        assert (w[..., ~causal] == 0).all() and (w[..., causal] > 0).all()


def test_ignore_index_masks_targets():
    model, idx = tiny_model(), torch.randint(0, TINY["vocab_size"], (2, 10))
    targets = idx.roll(-1, dims=1)
    masked = targets.clone()
    masked[:, 5:] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].flatten(0, 1), targets[:, :5].flatten())
    torch.testing.assert_close(loss, expected)


def test_greedy_generation_equals_transformers():
    model = tiny_model()
    hf = hf_twin(model)
    prompts = torch.randint(0, TINY["vocab_size"], (3, 8))
    ours = model.generate(prompts, 40, temperature=0)
    theirs = hf.generate(prompts, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                         pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompts))
    assert ours.shape == (3, 48)
    assert torch.equal(ours, theirs)


def test_kv_cache_gives_the_logits_of_a_full_forward():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        full = model(idx)[0]
        caches = [KVCache(2, model.config.n_ctx, model.config, "cpu", torch.float32) for _ in range(TINY["n_layer"])]
        pieces = [(0, 5), *((t, t + 1) for t in range(5, 12)), (12, 20)]  # a prompt, single tokens, a chunk
        stepped = torch.cat([model.lm_head(model.hidden_states(idx[:, a:b], caches)) for a, b in pieces], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


def generate_without_cache(model, idx, n, temperature=1.0):
    """The textbook loop: rerun the whole sequence, cropped to the last n_ctx tokens, for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.n_ctx:])
        idx = torch.cat([idx, GPT.sample_next(logits[:, -1], temperature)], dim=1)
    return idx


def test_cached_sampling_equals_recomputing_also_once_the_window_slides():
    model = tiny_model(n_ctx=16)
    prompts = torch.randint(0, TINY["vocab_size"], (2, 5))
    torch.manual_seed(5)
    with torch.no_grad():
        expected = generate_without_cache(model, prompts, 30)  # runs 19 tokens past the 16-token window
    torch.manual_seed(5)
    assert torch.equal(model.generate(prompts, 30, temperature=1.0), expected)


def test_prompt_longer_than_window_keeps_its_last_tokens():
    model = tiny_model(seed=1, n_ctx=16)  # (seed 0's greedy choices happen to ignore all but the last tokens)
    long = torch.randint(0, TINY["vocab_size"], (16, 40))
    out = model.generate(long, 20, temperature=0)
    assert out.shape == (16, 60) and torch.equal(out[:, :40], long)
    with torch.no_grad():  # each token from the full forward of exactly the last 16 tokens before it
        assert torch.equal(out, generate_without_cache(model, long, 20, temperature=0))
    with pytest.raises(ValueError, match="longer than the context window"):
        model(long)


def test_eos_stops_each_row():
    model = tiny_model()
    prompts = torch.randint(0, TINY["vocab_size"], (3, 4))
    torch.manual_seed(2)
    sampled = model.generate(prompts, 20)
    eos = sampled[0, 7].item()
    torch.manual_seed(2)
    out = model.generate(prompts, 20, eos_id=eos)
    stops = []  # new tokens each row keeps: up to and including its first eos
    for row in sampled[:, 4:]:
        hits = (row == eos).nonzero()
        stops.append(hits[0].item() + 1 if len(hits) else 20)
    assert out.size(1) == 4 + max(stops)
    for row, stop in enumerate(stops):
        assert out[row, : 4 + stop].equal(sampled[row, : 4 + stop])
        assert out[row, 4 + stop:].eq(eos).all()


def ragged_prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def test_ragged_batch_gives_each_prompt_what_it_gives_alone():
    model = tiny_model(seed=1, n_ctx=32)
    prompts = ragged_prompts([1, 5, 17, 30, 9, 2, 24, 12])  # rows 3 and 6 slide past the 32-token window
    out = model.generate(prompts, 12, temperature=0)
    alone = [model.generate(torch.tensor([p]), 12, temperature=0)[0].tolist() for p in prompts]
    assert out == alone
    eos = alone[4][len(prompts[4]) + 3]  # a token row 4 makes: rows stop at their first one, as alone
    out = model.generate(prompts, 12, temperature=0, eos_id=eos)
    for p, row, solo in zip(prompts, out, alone):
        new = solo[len(p):]
        assert row == p + (new[:new.index(eos) + 1] if eos in new else new)
    assert out[4][-1] == eos and len(out[4]) <= len(prompts[4]) + 4


def test_ragged_batch_equals_transformers_with_left_padding():
    """transformers' own left padding (attention mask, positions from the mask) as the reference."""
    model = tiny_model(seed=2)
    prompts = ragged_prompts([3, 11, 7, 1], seed=4)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    theirs = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
    assert model.generate(prompts, 15, temperature=0) == [p + row[T:] for p, row in zip(prompts, theirs.tolist())]


def test_padding_never_leaks_into_attention():
    """Each row's logits equal its own forward alone, whatever the padding tokens are; so sampling
    a ragged batch draws each row from the distribution it has alone."""
    model = tiny_model()
    prompts = ragged_prompts([6, 1, 13])
    pad = torch.tensor([13 - len(p) for p in prompts])
    with torch.no_grad():
        for filler in (0, 7, 95):
            batch = torch.tensor([[filler] * (13 - len(p)) + p for p in prompts])
            logits = model.lm_head(model.hidden_states(batch, pad=pad))
            for row, p in enumerate(prompts):
                torch.testing.assert_close(logits[row, pad[row]:], model(torch.tensor([p]))[0][0], atol=1e-5, rtol=0)


def test_ragged_batch_bad_prompts():
    model = tiny_model()
    for prompts in ([], [[1, 2], []]):
        with pytest.raises(ValueError, match="non-empty list of prompts"):
            model.generate(prompts, 3)


# -----------------------------------------------------------------------------
# Sampling


def test_top_k_1_and_temperature_0_are_greedy():
    model = tiny_model()
    prompts = torch.randint(0, TINY["vocab_size"], (2, 6))
    greedy = model.generate(prompts, 15, temperature=0)
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompts, 15, temperature=0.8, top_k=1), greedy)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6), (0.9, 8, 0.8)])
def test_sampled_frequencies_follow_the_warped_probabilities(temperature, top_k, top_p):
    """Which tokens survive and with what probability, against transformers' own warpers: the
    frequencies of 40,000 draws per row stay within 5 standard errors of those probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits, n = torch.randn(3, 40) * 2, 40_000
    reference = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p:
        reference = TopPLogitsWarper(top_p)(None, reference)
    probs = torch.softmax(reference, dim=-1)
    draws = GPT.sample_next(logits.repeat_interleave(n, dim=0), temperature, top_k, top_p).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=40) for row in draws]).float() / n
    assert (freq[probs == 0] == 0).all()  # never a token the reference removes
    tolerance = 5 * (probs * (1 - probs) / n).sqrt() + 1e-4
    assert ((freq - probs).abs() <= tolerance).all(), (freq - probs).abs().max()


def test_same_seed_same_tokens():
    model = tiny_model()
    prompts = torch.randint(0, TINY["vocab_size"], (2, 6))

    def draw(seed):
        torch.manual_seed(seed)
        return model.generate(prompts, 20, temperature=1.0, top_k=20, top_p=0.9)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


# -----------------------------------------------------------------------------
# OpenAI's TensorFlow checkpoints


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
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])
    c = hf.config
    hparams = {"n_vocab": c.vocab_size, "n_ctx": n_ctx, "n_embd": c.n_embd, "n_head": c.n_head, "n_layer": n_layer}
    (folder / "hparams.json").write_text(json.dumps(hparams))
    return folder


def test_expected_variables_equal_the_real_124M_index():
    with open(OPENAI_124M / "hparams.json") as f:
        hp = json.load(f)
    assert (hp["n_layer"], hp["n_head"], hp["n_embd"]) == (12, 12, 768)
    expected = {}
    for name, p in GPT.empty(GPTConfig.from_name("124M")).state_dict().items():
        if name != "lm_head.weight":  # tied to wte: OpenAI stores it once
            shape = tuple(p.shape)
            expected[GPT.openai_name(name)] = (1, shape[1], shape[0]) if p.dim() == 2 and "h." in name else shape
    assert expected == real_index()


def test_openai_checkpoint_loads_and_matches_transformers(tmp_path):
    hf = hf_twin(tiny_model(seed=3))
    folder = write_openai_checkpoint(tmp_path / "tiny", hf, n_ctx=TINY["n_ctx"])
    model = GPT.from_pretrained(str(folder))
    assert not model.training and model.config == GPTConfig(**TINY)
    idx = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_own_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=4)
    path = tmp_path / "ckpt.pt"
    torch.save(model.checkpoint(step=3), path)
    assert torch.load(path, weights_only=True)["step"] == 3
    loaded = GPT.from_pretrained(str(path))
    idx = torch.randint(0, TINY["vocab_size"], (1, 12))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_every_reader_gives_transformers_logits_and_one_layout(tmp_path):
    """The same weights as transformers' own folder, OpenAI's TensorFlow checkpoint and a .pt of ours:
    each loads to transformers' logits and greedy tokens, and to the same memory layout (the four block
    matrices keep (in, out) bytes, the head stays tied to wte), whatever the file."""
    model = tiny_model(seed=14)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path / "hf")
    write_openai_checkpoint(tmp_path / "openai", hf, n_ctx=TINY["n_ctx"])
    torch.save(model.checkpoint(), tmp_path / "ours.pt")
    idx = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        reference = hf(idx).logits
    greedy = hf.generate(idx[:, :5], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                         eos_token_id=None, attention_mask=torch.ones_like(idx[:, :5]))
    layouts = []
    for path in (tmp_path / "hf", tmp_path / "openai", tmp_path / "ours.pt"):
        loaded = GPT.from_pretrained(str(path))
        assert not loaded.training and loaded.config == GPTConfig(**TINY)
        with torch.no_grad():
            torch.testing.assert_close(loaded(idx)[0], reference, atol=1e-4, rtol=0)
        assert torch.equal(loaded.generate(idx[:, :5], 20, temperature=0), greedy), path
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        layouts.append({name: (p.dtype, p.shape, p.stride()) for name, p in loaded.named_parameters()})
        for name, p in loaded.named_parameters():
            assert (p.t() if name.endswith(GPT.CONV1D) else p).is_contiguous(), (path, name)
    assert layouts[0] == layouts[1] == layouts[2]


def test_gpt2_py_copied_alone_imports_generates_and_reloads(tmp_path):
    """gpt2.py in an empty folder: it imports with torch and tiktoken (nothing of the project, no
    TensorFlow, safetensors or transformers), generates, and reads its own checkpoint back."""
    shutil.copy(ROOT / "gpt2.py", tmp_path)
    code = ("import sys, torch, gpt2\n"
            "m = gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32))\n"
            "prompt = torch.tensor([gpt2.Tokenizer().encode('Every effort')])\n"
            "out = m.generate(prompt, 5, temperature=0)\n"
            "torch.save(m.checkpoint(), 'm.pt')\n"
            "again = gpt2.GPT.from_pretrained('m.pt').generate(prompt, 5, temperature=0)\n"
            "print(out.shape[1], torch.equal(again, out), gpt2.__file__)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in\n"
            "      {'common', 'tensorflow', 'safetensors', 'transformers', 'train', 'sample'}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [f"7 True {tmp_path / 'gpt2.py'}", "[]"]


def test_size_names_read_the_models_folder(tmp_path, monkeypatch):
    """GPT.from_pretrained("gpt2") reads models/124M/, as download_weights.py fills it; a size not
    downloaded yet is an error that gives the download command."""
    model = tiny_model(seed=15)
    hf_twin(model).save_pretrained(tmp_path / "models" / "124M")
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "124M"):
        loaded = GPT.from_pretrained(name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items()), name
    with pytest.raises(FileNotFoundError, match=r"models/355M not found: run  python download_weights.py --model 355M"):
        GPT.from_pretrained("gpt2-medium")


def test_weights_of_other_number_types(tmp_path):
    """A float64 file loads as float32 (exactly the rounded weights); integers are not weights: one
    line that names the tensor, its type and the file."""
    from safetensors.torch import save_file

    model = tiny_model(seed=16)
    folder = tmp_path / "f64"
    hf_twin(model).double().save_pretrained(folder)
    loaded = GPT.from_pretrained(str(folder))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    tensors = {k: v.contiguous() for k, v in hf_twin(model).state_dict().items() if k != "lm_head.weight"}
    tensors["transformer.h.0.ln_1.bias"] = torch.zeros(TINY["n_embd"], dtype=torch.int64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"transformer.h.0.ln_1.bias in {folder} holds torch.int64 numbers"):
        GPT.from_pretrained(str(folder))


def test_empty_model_has_shapes_and_no_memory():
    model = GPT.empty(GPTConfig.from_name("1558M"))  # 6 GB of weights if they were there
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_557_611_200


# -----------------------------------------------------------------------------
# Bad input: each a clear message


def test_unknown_size_name():
    assert size_name("gpt2-medium") == "355M" and size_name("1558M") == "1558M"
    with pytest.raises(ValueError, match="unknown model size 'gpt5'.*124M.*gpt2-xl"):
        GPTConfig.from_name("gpt5")


def test_missing_folder_and_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: neither a .pt of ours nor a folder with config.json"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.ckpt.data-00000-of-00001 not found.*incomplete"):
        GPT.from_pretrained(str(OPENAI_124M))  # the real folder, whose 497 MB data file is absent


def test_variable_of_wrong_shape_or_name(tmp_path):
    hf = hf_twin(tiny_model())

    def shrink(v):
        v["model/h1/mlp/c_fc/b"] = v["model/h1/mlp/c_fc/b"][:-1]

    folder = write_openai_checkpoint(tmp_path / "bad", hf, n_ctx=TINY["n_ctx"], tweak=shrink)
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc.bias in .* of shape \[127\], not weights of shape \[128\]"):
        GPT.from_pretrained(str(folder))

    def rename(v):
        v["model/h1/mlp/c_fc/bias"] = v.pop("model/h1/mlp/c_fc/b")

    folder = write_openai_checkpoint(tmp_path / "renamed", hf, n_ctx=TINY["n_ctx"], tweak=rename)
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\], unexpected \['model/h1/mlp/c_fc/bias'\]"):
        GPT.from_pretrained(str(folder))


def test_checkpoint_of_another_shape(tmp_path):
    ckpt = tiny_model().checkpoint()
    ckpt["config"]["n_embd"] = 64  # the weights no longer fit the config
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt holds torch.float32 numbers of shape \[96, 32\], not weights of shape \[96, 64\]"):
        GPT.from_pretrained(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        GPT.from_pretrained(str(tmp_path / "other.pt"))
    torch.save({**tiny_model().checkpoint(), "labels": ["ham", "spam"]}, tmp_path / "classifier.pt")
    with pytest.raises(ValueError, match=r"classifier.pt is a classifier \(ham/spam\), not a language model"):
        GPT.from_pretrained(str(tmp_path / "classifier.pt"))


# =============================================================================
# download_weights.py (against a server on 127.0.0.1) and sample.py


# -----------------------------------------------------------------------------
# download_weights.py and common.download, against a server on 127.0.0.1


class _DlHandler(BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}, honouring "Range: bytes=N-" unless server.ignore_range.
    A path in server.cut_once is sent only half through, once: the connection drops mid-file."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def dl_server(serve):
    return serve(_DlHandler, files={}, requests=[], cut_once=set(), ignore_range=False)


@pytest.fixture
def dl_no_wait(monkeypatch):
    monkeypatch.setattr(common, "RETRY_WAIT", 0.0)


def _dl_release(size):
    """The files of a release as the server holds them: the real tokenizer files, and for 124M
    the real small checkpoint files; for other sizes a tiny real checkpoint (which the download
    then converts); anything else is made-up bytes."""
    real = {name: (SHARED / "gpt2-124M" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    if size == "124M":
        real |= {name: (SHARED / "gpt2-124M" / name).read_bytes()
                 for name in ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.meta")}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = write_openai_checkpoint(Path(tmp), hf_twin(tiny_model()), n_ctx=TINY["n_ctx"])
            real |= {name: (tiny / name).read_bytes() for name in ("hparams.json", "model.ckpt.index",
                                                                   "model.ckpt.data-00000-of-00001")}
    fake = {name: os.urandom(1000 + 37 * i) for i, name in enumerate(download_weights.FILES)}
    return {f"/{size}/{name}": real.get(name, fake[name]) for name in download_weights.FILES}


def test_dl_sizes_table_is_true():
    """The published sizes: 124M's small files against the real ones in shared/data, its data file
    against 4 bytes per float32 that the real index lists, and 355M's data file likewise from its shape."""
    for sizes in download_weights.PUBLISHED.values():
        assert set(sizes) <= set(download_weights.FILES)
    assert set(download_weights.PUBLISHED) == {"124M", "355M", "774M", "1558M"}
    table = {**download_weights.SAME_FOR_ALL, **download_weights.PUBLISHED["124M"]}
    data = "model.ckpt.data-00000-of-00001"
    for name in set(download_weights.FILES) - {data}:
        assert (OPENAI_124M / name).stat().st_size == table[name], name
    assert table[data] == 4 * sum(math.prod(shape) for shape in real_index().values()) == 497_759_232
    n_355m = sum(p.numel() for p in GPT.empty(GPTConfig.from_name("355M")).state_dict().values()) - 50257 * 1024  # tied head
    assert download_weights.PUBLISHED["355M"][data] == 4 * n_355m


def test_dl_interrupted_transfer_resumes_with_range(dl_server, dl_no_wait, tmp_path, monkeypatch, capsys):
    """124M with the real small files (only the data file's published size is shrunk to a fake
    one): model.ckpt.meta drops half way, the retry asks for the rest and the file comes out whole."""
    dl_server.files = _dl_release("124M")
    data = "model.ckpt.data-00000-of-00001"
    monkeypatch.setitem(download_weights.PUBLISHED, "124M",
                        {**download_weights.PUBLISHED["124M"], data: len(dl_server.files[f"/124M/{data}"])})
    dl_server.cut_once = {"/124M/model.ckpt.meta"}
    monkeypatch.setattr(download_weights, "convert", lambda folder: None)  # the data file is made up
    monkeypatch.setattr(sys, "argv", ["download_weights.py", "--model", "gpt2",
                                      "--models-dir", str(tmp_path), "--base-url", dl_server.url])
    download_weights.main()
    for path, body in dl_server.files.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body, path
    meta_requests = [r for p, r in dl_server.requests if p == "/124M/model.ckpt.meta"]
    assert len(meta_requests) == 2 and meta_requests[0] is None
    resumed_at = int(meta_requests[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(dl_server.files["/124M/model.ckpt.meta"]) // 2  # the bytes it had kept
    assert "retry 1/2" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.part"))


def test_dl_cut_then_next_run_resumes(dl_server, dl_no_wait, tmp_path):
    """A run that gives up leaves its .part; the next run fetches only the missing bytes."""
    body = os.urandom(300_000)
    dl_server.files = {"/f": body}
    dl_server.cut_once = {"/f"}
    dest = str(tmp_path / "f")
    with pytest.raises(UserError, match="run again"):
        download(dl_server.url + "/f", dest, size=len(body), retries=1)
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept <= len(body) // 2 and not os.path.exists(dest)
    download(dl_server.url + "/f", dest, size=len(body), retries=1)
    assert Path(dest).read_bytes() == body and not os.path.exists(dest + ".part")
    assert dl_server.requests[-1] == ("/f", f"bytes={kept}-")


def test_dl_server_ignoring_range_starts_over(dl_server, dl_no_wait, tmp_path):
    body = os.urandom(300_000)
    dl_server.files, dl_server.cut_once, dl_server.ignore_range = {"/f": body}, {"/f"}, True
    dest = str(tmp_path / "f")
    download(dl_server.url + "/f", dest)  # no size given: the server's Content-Length is checked
    assert Path(dest).read_bytes() == body
    assert len(dl_server.requests) == 2 and dl_server.requests[1][1].startswith("bytes=")  # asked, got 200


def test_dl_unknown_size_checked_against_content_length(dl_server, dl_no_wait, tmp_path):
    body = os.urandom(300_000)
    dl_server.files = {"/f": body}
    dl_server.cut_once = {"/f"}
    dest = str(tmp_path / "f")
    with pytest.raises(UserError, match="could not download"):
        download(dl_server.url + "/f", dest, retries=1)
    assert not os.path.exists(dest)


def test_dl_whole_part_is_renamed_without_a_request(dl_server, tmp_path):
    dest = tmp_path / "f"
    Path(str(dest) + ".part").write_bytes(b"x" * 100)
    download(dl_server.url + "/f", str(dest), size=100)
    assert dest.read_bytes() == b"x" * 100 and dl_server.requests == []


def test_dl_ensure_file(dl_server, dl_no_wait, tmp_path):
    dl_server.files = {"/f": b"hello"}
    path = tmp_path / "sub" / "f"
    assert common.ensure_file(str(path), dl_server.url + "/f") == str(path) and path.read_bytes() == b"hello"
    n = len(dl_server.requests)
    common.ensure_file(str(path), dl_server.url + "/f")  # there already: no request
    assert len(dl_server.requests) == n
    n = len(dl_server.requests)
    with pytest.raises(UserError, match="answered HTTP 404 Not Found: no such file there"):
        common.ensure_file(str(tmp_path / "g"), dl_server.url + "/missing")  # 404: not a connection problem
    assert len(dl_server.requests) == n + 1  # asked once, not retried
    assert not list(tmp_path.glob("g*"))


def test_dl_script_downloads_then_skips(dl_server, tmp_path):
    """774M: the tokenizer files are checked against their published sizes, the rest against
    Content-Length, and the checkpoint is converted; a second run requests and converts nothing."""
    dl_server.files = _dl_release("774M")
    args = ["--model", "gpt2-large", "--models-dir", tmp_path, "--base-url", dl_server.url]
    r = run_script("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    for path, body in dl_server.files.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body, path
    assert "converting" in r.stdout and download_weights.converted(tmp_path / "774M")
    converted = snapshot(tmp_path / "774M")
    n = len(dl_server.requests)
    r = run_script("download_weights.py", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("complete, skipped") == 7 and len(dl_server.requests) == n
    assert "converted already, skipped" in r.stdout and snapshot(tmp_path / "774M") == converted


def test_dl_script_refuses_wrong_size(dl_server, tmp_path):
    dl_server.files = _dl_release("774M")
    dl_server.files["/774M/vocab.bpe"] = dl_server.files["/774M/vocab.bpe"][:-10]  # truncated on the server
    r = run_script("download_weights.py", "--model", "774M", "--models-dir", tmp_path, "--base-url", dl_server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # above it: the progress bars of the files before
    assert last.startswith("error: ") and "published size is 456,318" in last
    folder = tmp_path / "774M"
    assert not (folder / "vocab.bpe").exists() and not (folder / "vocab.bpe.part").exists()
    assert (folder / "encoder.json").exists()  # the files before it were fine


def test_dl_script_unreachable_server(tmp_path):
    port = free_port()
    r = run_script("download_weights.py", "--models-dir", tmp_path, "--base-url", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download") and "check your connection" in last
    assert not list(tmp_path.rglob("checkpoint*"))


def test_dl_script_unknown_model(tmp_path):
    r = run_script("download_weights.py", "--model", "gpt3", "--models-dir", tmp_path)
    assert r.returncode == 1 and "unknown model size 'gpt3'" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 folders (config.json + model.safetensors): in and out, against transformers


def hf_logits_equal(ours, hf, vocab_size):
    idx = torch.randint(0, vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, run_main):
    """Our .pt (context 64) -> --export-hf -> transformers' own loader: the same logits, and the
    file holds the names, shapes and config that transformers' save_pretrained writes."""
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    model = tiny_model(seed=11)
    save_atomic(model.checkpoint(), str(tmp_path / "tiny.pt"))
    out = tmp_path / "hf"
    r = run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", out)
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.n_positions == 64 and hf.config.n_layer == 2
    hf_logits_equal(model, hf, TINY["vocab_size"])
    hf_twin(model).save_pretrained(tmp_path / "theirs")
    shapes = {}
    for folder in (out, tmp_path / "theirs"):
        with safe_open(folder / "model.safetensors", "pt") as f:
            shapes[folder] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes[out] == shapes[tmp_path / "theirs"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64  # n_ctx: llama.cpp's converter reads that one
    line = one_line_error(run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", out))
    assert f"{out / 'model.safetensors'} is from an earlier run and would be replaced" in line
    assert run_main("download_weights.py", "--export-hf", out, out, "--overwrite").returncode == 0  # read, then rewritten
    hf_logits_equal(GPT.from_pretrained(str(out)), hf, TINY["vocab_size"])


def test_hf_transformers_folders_load_with_the_same_logits(tmp_path):
    """transformers' own random GPT-2 (context 48), as save_pretrained writes it (float32, then
    float16), and as the Hub's gpt2 holds it (names without 'transformer.', the attention masks,
    an older config.json) -> GPT.from_pretrained: transformers' logits, the weights exactly."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(12)
    config = GPT2Config(vocab_size=100, n_positions=48, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "f32")
    ours = GPT.from_pretrained(str(tmp_path / "f32"))
    assert not ours.training and ours.config == GPTConfig(vocab_size=100, n_ctx=48, n_embd=64, n_head=4, n_layer=2)
    for name, p in ours.named_parameters():  # the four block matrices keep the file's (in, out) bytes, seen through .t()
        assert (p.t() if name.endswith(GPT.CONV1D) else p).is_contiguous(), name
    hf_logits_equal(ours, hf, 100)

    hf.half().save_pretrained(tmp_path / "f16")
    half = GPT.from_pretrained(str(tmp_path / "f16"))
    hf.float()
    for name, p in half.state_dict().items():  # float16 -> float32 is exact
        assert torch.equal(p, ours.state_dict()[name].half().float()), name

    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "f32" / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48) for i in range(2)}
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text(json.dumps({  # the Hub's openai-community/gpt2 config.json, tiny
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
        "bos_token_id": 50256, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2", "n_ctx": 48, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 48,
        "resid_pdrop": 0.1, "vocab_size": 100}))
    for name, p in GPT.from_pretrained(str(hub)).state_dict().items():
        assert torch.equal(p, ours.state_dict()[name]), name


def test_hf_converted_checkpoint_equals_the_tensorflow_one_and_loads_without_tensorflow(tmp_path):
    """OpenAI's layout, written with TensorFlow -> download_weights' conversion -> model.safetensors
    loads to bitwise the TensorFlow load's weights, in a process that never imports TensorFlow; the
    tokenizer files beside it give transformers tiktoken's ids."""
    from transformers import GPT2Tokenizer

    folder = write_openai_checkpoint(tmp_path / "124M", hf_twin(tiny_model(seed=13)), n_ctx=TINY["n_ctx"])
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(OPENAI_124M / name, folder / name)
    from_tf = GPT.from_pretrained(str(folder))
    assert not download_weights.converted(folder)
    download_weights.convert(str(folder))
    assert download_weights.converted(folder)
    from_st = GPT.from_pretrained(str(folder))
    for name, p in from_tf.state_dict().items():
        assert torch.equal(from_st.state_dict()[name], p), name
    code = ("import sys, common; m = common.load_model(sys.argv[1]); "
            "print('tensorflow' in sys.modules, sum(p.double().sum().item() for p in m.parameters()))")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", str(sum(p.double().sum().item() for p in from_tf.parameters()))]
    text = "Every effort moves you, naïvely, 1234 times!\n"
    assert GPT2Tokenizer.from_pretrained(folder).encode(text) == Tokenizer().encode(text)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-4])
    assert not download_weights.converted(folder)  # partial: download_weights.py converts again


def test_hf_bad_files_are_one_clear_line(tmp_path, run_main):
    """Each broken Hugging Face folder: sample.py stops with one line naming the file and the fault."""
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    save_atomic(tiny_model().checkpoint(), str(tmp_path / "tiny.pt"))
    assert run_main("download_weights.py", "--export-hf", tmp_path / "tiny.pt", good).returncode == 0
    tensors = load_file(good / "model.safetensors")

    def broken(name, config=None, tensors_=None, data=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if config:
            (folder / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()), **config}))
        if tensors_ is not None:
            save_file(tensors_, folder / "model.safetensors")
        if data is not None:
            (folder / "model.safetensors").write_bytes(data)
        return one_line_error(run_main("sample.py", "--model", folder, "--max-new-tokens", 1)), folder / "model.safetensors"

    whole = (good / "model.safetensors").read_bytes()
    line, path = broken("cut", data=whole[:len(whole) // 2])
    assert f"{path} is not a whole safetensors file" in line and "not fully covered" in line
    line, path = broken("junk", data=os.urandom(5000))
    assert f"{path} is not a whole safetensors file" in line
    line, _ = broken("llama", config={"model_type": "llama"})
    assert "config.json has model_type 'llama'; gpt2.py computes GPT-2 with 'gpt2'" in line
    line, _ = broken("relu", config={"activation_function": "relu"})
    assert "config.json has activation_function 'relu'" in line
    line, path = broken("missing", tensors_={k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    assert f"{path.parent} does not fit the model: missing ['transformer.h.1.mlp.c_fc.bias'], unexpected []" in line
    line, path = broken("shape", tensors_={**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)})
    # the file's (in, out) (96, 32) is nn.Linear's (32, 96): the wrong way round
    assert f"transformer.h.0.attn.c_attn.weight in {path.parent} holds torch.float32 numbers of shape [32, 96], " \
           "not weights of shape [96, 32]" in line
    line, _ = broken("wider", config={"n_embd": 64})
    assert "not weights of shape" in line
    line, _ = broken("noconfig", config={"n_positions": None, "n_layer": "two"})
    assert "config.json holds no GPT-2 config" in line


# -----------------------------------------------------------------------------
# sample.py, on a tiny train.py-style checkpoint

SAMPLE_PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_ctx=64, n_embd=64, n_head=4, n_layer=2)).eval()
    path = str(tmp_path_factory.mktemp("sample") / "tiny.pt")
    save_atomic(model.checkpoint(step=0), path)
    return model, path


@pytest.fixture
def sample(run_main):
    """sample(checkpoint, *args): sample.py's main() in this process -> a CompletedProcess."""
    return lambda path, *args: run_main("sample.py", "--model", path, "--device", "cpu", *args)


def test_sample_same_seed_same_text(sample_ckpt, sample):
    _, path = sample_ckpt
    runs = [sample(path, "--seed", seed, "--num-samples", 2, "--max-new-tokens", 12) for seed in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    first, second = runs[0].stdout.split("\n" + "-" * 40 + "\n")
    assert first.startswith(SAMPLE_PROMPT) and second.startswith(SAMPLE_PROMPT) and first != second


def test_sample_greedy_equals_generate(sample_ckpt, sample):
    """--temperature 0 prints the prompt and then exactly what model.generate decodes to, here
    past the 64-token window."""
    model, path = sample_ckpt
    prompt = SAMPLE_PROMPT + " to the end of the road, and further"
    r = sample(path, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 60)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), 60, temperature=0)
    assert r.stdout == prompt + tok.decode(out[0, len(ids):].tolist()) + "\n"
    batch = sample(path, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 60, "--num-samples", 3)
    assert batch.stdout.split("\n" + "-" * 40 + "\n") == [r.stdout] * 3  # one batch, each row as the single run


def test_sample_prints_characters_split_over_tokens_whole(capsys):
    from sample import print_as_generated

    tok = Tokenizer()
    text = "naïve 🙂 café 你好 👍🏽"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))  # some tokens end mid-character
    print_as_generated(iter(ids), tok)
    assert capsys.readouterr().out == text + "\n"  # a U+FFFD once printed would stay in the output


def test_sample_instruction_uses_the_alpaca_prompt(sample_ckpt, sample):
    """--instruction: the prompt is format_prompt(entry) and only the response is printed."""

    model, path = sample_ckpt
    entry = {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal."}
    r = sample(path, "--instruction", entry["instruction"], "--input", entry["input"],
                "--temperature", 0, "--max-new-tokens", 10)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = tok.encode(format_prompt(entry))
    out = model.generate(torch.tensor([ids]), 10, temperature=0, eos_id=tok.eot_id)
    assert tok.eot_id not in out[0, len(ids):]  # (this random model never ends: see the next test)
    assert r.stdout == tok.decode(out[0, len(ids):].tolist()) + "\n"


def test_sample_instruction_stops_at_end_of_text(sample_ckpt, tmp_path, sample):
    """A model rigged to answer " Yes" and then <|endoftext|>: sample.py prints " Yes" alone."""
    tok = Tokenizer()
    yes, eot = tok.encode(" Yes")[0], tok.eot_id
    model = GPT(sample_ckpt[0].config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Zero blocks leave each position's vector as its token's embedding: zero for all but
        # " Yes" (e0) and <|endoftext|> (e1). After any other token ln_f gives its bias e0, so
        # " Yes" scores highest; after " Yes" the weights below turn e0 into mostly +e1: end.
        model.transformer.wte.weight[yes, 0] = model.transformer.wte.weight[eot, 1] = 1.0
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.ln_f.weight[0], model.transformer.ln_f.weight[1] = -1.0, -100.0
    path = str(tmp_path / "yes.pt")
    save_atomic(model.checkpoint(), path)
    assert tok.decode(model.generate(torch.tensor([[0]]), 4, temperature=0)[0, 1:].tolist()) == " Yes<|endoftext|>" * 2
    r = sample(path, "--instruction", "Is the sky blue?", "--temperature", 0, "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == " Yes\n"


def test_sample_tokenizer_of_an_openai_folder(sample_ckpt, tmp_path, monkeypatch):
    """A size name or folder reads the folder's encoder.json (offline); a .pt uses tiktoken's."""
    import tiktoken
    from common import load_tokenizer as tokenizer_for

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "124M").symlink_to(SHARED / "gpt2-124M")
    monkeypatch.chdir(tmp_path)
    text = "Every effort moves you, naïvely 🙂"
    for spec in ("gpt2", str(SHARED / "gpt2-124M")):
        tok = tokenizer_for(spec)
        assert tok.enc is not tiktoken.get_encoding("gpt2") and tok.encode(text) == Tokenizer().encode(text)
    assert tokenizer_for(sample_ckpt[1]).enc is tiktoken.get_encoding("gpt2")


def test_sample_prompt_longer_than_context(sample_ckpt, sample):
    _, path = sample_ckpt
    prompt = "word " * 100
    r = sample(path, "--prompt", prompt)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    n = len(Tokenizer().encode(prompt))
    assert f"the prompt is {n} tokens, longer than the model's context window (64)" in r.stderr


def test_sample_missing_model_names_the_download_command(tmp_path):
    r = run_script("sample.py", "--model", "gpt2", cwd=tmp_path)  # no models/ here
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python download_weights.py --model 124M" in r.stderr


def test_scripts_help():
    for script in ("sample.py", "download_weights.py"):
        r = run_script(script, "--help")
        assert r.returncode == 0 and "(default: " in r.stdout, script


# =============================================================================
# train.py: tiny runs on the real the-verdict.txt


TRAIN_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--context-length", "32"]


def train_verdict(tmp_path):
    """A copy of the real the-verdict.txt in tmp_path (its token cache is written beside it)."""
    return shutil.copy(SHARED / "the-verdict.txt", tmp_path / "the-verdict.txt")


def train_args(data, out, *args):
    return ["--data", data, "--out-dir", out, *TRAIN_TINY, *args]


def train_run(data, out, *args, launcher=(sys.executable,)):
    r = run_script("train.py", *train_args(data, out, *args), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_tiny_learns_and_reports_true_losses(tmp_path):
    data, out = train_verdict(tmp_path), tmp_path / "out"
    r = train_run(data, out, "--max-iters", "40", "--batch-size", "4", "--lr", "3e-3", "--eval-interval", "20",
                  "--dropout", "0")
    ckpt = train_load(out / "ckpt.pt")
    hist = ckpt["history"]
    assert ckpt["step"] == 40 and hist["step"] == [0, 20, 40] and len(hist["loss"]) == 40
    assert abs(hist["val"][0] - math.log(50257)) < 0.3  # untrained: about uniform over the vocabulary
    assert hist["val"][-1] < hist["val"][0] - 2.5
    assert "Every effort moves you" in r.stdout and "val loss" in r.stdout

    # The final validation loss, recomputed here from tiktoken's ids: last 10% of tokens, windows of 32, stride 32.
    ids = tiktoken.get_encoding("gpt2").encode(data.read_text(encoding="utf-8"))
    val = ids[int(0.9 * len(ids)):]
    windows = torch.tensor([val[i:i + 33] for i in range(0, len(val) - 32, 32)])
    model = GPT.from_pretrained(str(out / "ckpt.pt"))
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert len(windows) == 16 and abs(loss - hist["val"][-1]) < 1e-4

    best = train_load(out / "best.pt")  # the best validation loss so far is the last one here
    assert best["step"] == 40 and abs(best["val_loss"] - min(hist["val"])) < 1e-9
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    r = run_script("train.py", "--eval-only", "--init-from", out / "ckpt.pt", "--data", data, "--context-length", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    all_windows = torch.tensor([ids[i:i + 33] for i in range(0, len(ids) - 32, 32)])
    with torch.no_grad():
        logits, _ = model(all_windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), all_windows[:, 1:].flatten()).item()
    assert f"{len(all_windows)} windows of 32 tokens, loss {loss:.4f}" in r.stdout


def test_train_resume_after_ctrl_c_is_bitwise_exact(tmp_path):
    data = train_verdict(tmp_path)
    args = ["--max-iters", "60", "--batch-size", "2", "--eval-interval", "5", "--dropout", "0.1"]
    train_run(data, tmp_path / "straight", *args)

    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, ROOT / "train.py", *map(str, train_args(data, out, *args))], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first checkpoint appears at step 5, in the middle of the run
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    stopped_at = train_load(out / "ckpt.pt")["step"]
    assert 5 <= stopped_at < 60 and "--resume continues" in stdout
    train_run(data, out, "--resume")

    a, b = train_load(tmp_path / "straight" / "ckpt.pt"), train_load(out / "ckpt.pt")
    assert a["step"] == b["step"] == 60
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    assert a["history"] == b["history"]


def test_train_two_processes_match_one(tmp_path):
    data = train_verdict(tmp_path)
    args = ["--max-iters", "4", "--batch-size", "4", "--eval-interval", "2", "--dropout", "0", "--lr", "1e-3"]
    train_run(data, tmp_path / "one", *args)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    r = train_run(data, tmp_path / "two", *args, launcher=torchrun)
    assert "2 process(es)" in r.stdout
    one, two = train_load(tmp_path / "one" / "ckpt.pt")["history"], train_load(tmp_path / "two" / "ckpt.pt")["history"]
    assert len(one["loss"]) == len(two["loss"]) == 4
    for key in ("loss", "train", "val"):
        assert max(abs(x - y) for x, y in zip(one[key], two[key])) < 1e-5, key
    assert one["loss"][-1] < one["loss"][0]  # it did train


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
    docs = {folder / "a-shakespeare.txt": (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000],
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
    import train

    monkeypatch.setattr(train, "CHUNK_CHARS", 1000)  # hundreds of pieces, cut between multibyte characters
    monkeypatch.setattr(train, "SHARD_TOKENS", 10_000)
    paths = data_documents(tmp_path / "docs")
    assert all(len(list(train.read_pieces([p]))) > 50 for p in paths if p.stat().st_size > 10_000)
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
    import train

    monkeypatch.setattr(train, "SHARD_TOKENS", 5_000)
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


def test_train_from_many_shards_gives_the_losses_of_one(tmp_path, monkeypatch):
    import train

    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    monkeypatch.setattr(train, "SHARD_TOKENS", 700)  # 8 shards: many windows of 33 tokens span two
    tokens = load_tokens(train_verdict(many), Tokenizer())
    assert len(tokens.shards) == 8
    args = ["--max-iters", "4", "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2", "--dropout", "0.1"]
    train_run(train_verdict(one), one / "out", *args)
    train_run(many / "the-verdict.txt", many / "out", *args)
    a, b = train_load(one / "out" / "ckpt.pt"), train_load(many / "out" / "ckpt.pt")
    assert len(b["history"]["loss"]) == 4 and b["history"]["step"] == [0, 4]
    assert a["history"] == b["history"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_train_bad_data_is_one_clear_line(tmp_path, run_main):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Far too short to train on. " * 20, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    cases = {"missing.txt": "not found", "latin1.txt": "is not UTF-8", "short.txt": "too short", "empty": "no .txt files"}
    for name, message in cases.items():
        r = run_main("train.py", *train_args(tmp_path / name, tmp_path / "out"))
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_default_data_offline_says_where_to_put_it(tmp_path):
    env = {**ENV, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = run_script("train.py", *TRAIN_TINY, cwd=tmp_path, env=env, timeout=120)
    *retries, last = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("error: could not download") and "data/the-verdict.txt" in last and "--data" in last
    assert len(retries) == 3 and all(len(line) < 60 for line in retries[1:])  # "not found: downloading", 2 short retries
    assert not (tmp_path / "data" / "the-verdict.txt").exists()


# =============================================================================
# finetune_spam.py: the real SMS Spam Collection


SPAM_DATA = SHARED / "sms-spam" / "SMSSpamCollection"
SPAM_TINY = ["--init-from", "scratch", "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--context-length", "300"]


def spam_sample(folder):
    """folder/sample.tsv: the real file's first 60 ham and first 60 spam lines."""
    lines = SPAM_DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    sample = [l for l in lines if l.startswith("ham\t")][:60] + [l for l in lines if l.startswith("spam\t")][:60]
    (folder / "sample.tsv").write_text("".join(sample), encoding="utf-8")


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    """A tiny fine-tuning run on 60 ham and 60 spam lines of the real file."""
    tmp = tmp_path_factory.mktemp("spam")
    spam_sample(tmp)
    r = run_script("finetune_spam.py", "--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out", "--epochs", "2",
                    "--lr", "1e-3", "--seed", "7", *SPAM_TINY, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp


def test_spam_reads_every_line_of_the_real_file():
    messages = fs.read_messages(SPAM_DATA)
    raw = SPAM_DATA.read_bytes().split(b"\n")
    assert len(messages) == sum(1 for l in raw if l) == 5574
    assert sum(1 for label, _ in messages if label == "spam") == sum(1 for l in raw if l.startswith(b"spam\t")) == 747
    with open(SPAM_DATA, encoding="utf-8", newline="") as f:  # CSV quoting (pandas' default) merges lines
        assert len(list(csv.reader(f, delimiter="\t"))) == 5572


def test_spam_split_is_balanced_deterministic_and_kept(tmp_path):
    messages = fs.read_messages(SPAM_DATA)
    split = fs.balanced_split(messages, 123)
    assert split == fs.balanced_split(messages, 123)
    assert split != fs.balanced_split(messages, 124)
    assert {name: len(ms) for name, ms in split.items()} == {"train": 1045, "validation": 149, "test": 300}
    everything = [m for ms in split.values() for m in ms]
    assert sum(1 for label, _ in everything if label == "spam") == sum(1 for label, _ in everything if label == "ham") == 747
    # each line of the file at most once over the three parts (by identity: the file repeats some texts)
    lines = {id(m) for m in messages}
    assert all(id(m) in lines for m in everything) and len({id(m) for m in everything}) == len(everything)
    fs.write_split(split, tmp_path / "a", 123)
    fs.write_split(fs.balanced_split(messages, 123), tmp_path / "b", 123)
    for name in split:
        a, b = (tmp_path / d / f"{name}-seed123.tsv" for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
        assert fs.read_messages(a) == split[name]


def test_spam_last_real_token_of_padded_batch():
    torch.manual_seed(0)
    model = fs.with_class_head(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=64))).eval()
    tok = Tokenizer()
    texts = ["Hi", "WINNER!! Claim your prize now by calling 09061701461", "see you at 5 then"]
    examples = [(tok.encode(t), i % 2) for i, t in enumerate(texts)]
    idx, lengths, labels = next(fs.batches(examples, 8, "cpu"))
    assert lengths.tolist() == [len(ids) for ids, _ in examples] and labels.tolist() == [0, 1, 0]
    assert idx.shape == (3, max(lengths)) and idx[0, lengths[0]:].eq(fs.PAD_ID).all()
    with torch.no_grad():
        batched = fs.classify(model, idx, lengths)
        alone = torch.cat([fs.classify(model, torch.tensor([ids]), torch.tensor([len(ids)])) for ids, _ in examples])
        at_padding = model.lm_head(model.hidden_states(idx)[:, -1])
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(at_padding[0], alone[0])  # the padding's own state would give another answer
    model.pool = "mean"  # the mean over the real tokens: the padding does not count either
    with torch.no_grad():
        batched = fs.classify(model, idx, lengths)
        alone = torch.cat([fs.classify(model, torch.tensor([ids]), torch.tensor([len(ids)])) for ids, _ in examples])
    torch.testing.assert_close(batched, alone)


def test_spam_metrics_by_hand():
    m = fs.metrics(preds=[1, 0, 1, 1, 0], labels=[1, 0, 0, 1, 1])  # TP 2, TN 1, FP 1, FN 1
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_spam_freezes_all_but_the_last_blocks():
    model = fs.with_class_head(GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, n_ctx=8)))
    fs.freeze_all_but(model, "1")
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.h.2.ln_1", "transformer.h.2.attn.c_attn", "transformer.h.2.attn.c_proj",
                         "transformer.h.2.ln_2", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj",
                         "transformer.ln_f", "lm_head"}
    assert model.transformer.wte.weight.shape == (50257, 16)  # the new head left the embedding alone


def test_spam_learning_rate_schedule():
    constant = fs.parser().parse_args(["--lr", "1e-3"])
    assert {common.learning_rate(step, 100, constant) for step in range(100)} == {1e-3}
    cosine = fs.parser().parse_args(["--lr", "1e-3", "--min-lr", "1e-5", "--warmup-iters", "10"])
    lrs = [common.learning_rate(step, 100, cosine) for step in range(100)]
    assert lrs[:10] == pytest.approx([1e-4 * (step + 1) for step in range(10)])  # linear warmup, --lr at step 9
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)  # then cosine down to --min-lr
    assert lrs[(10 + 99) // 2] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.05)  # halfway down halfway through
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_spam_tiny_run_trains_saves_and_classifies(spam_run):
    split = {name: fs.read_messages(spam_run / "split" / f"{name}-seed7.tsv") for name in ("train", "validation", "test")}
    assert {name: len(ms) for name, ms in split.items()} == {"train": 84, "validation": 12, "test": 24}
    report = json.loads((spam_run / "out" / "metrics.json").read_text())
    for name, ms in split.items():
        assert sum(map(sum, report[name]["confusion"])) == len(ms)
    # it learned: the training loss fell each epoch, to well under a coin toss's ln 2 ...
    train_losses = [h["train"]["loss"] for h in report["history"]]
    assert [h["epoch"] for h in report["history"]] == [1, 2] and train_losses[1] < train_losses[0]
    assert report["train"]["loss"] < 0.5 * math.log(2)

    # ... and it beats always answering the larger class, clearly on train and also on unseen messages
    def majority(names):
        return max(sum(label == c for name in names for label, _ in split[name]) for c in fs.LABELS) / sum(len(split[n]) for n in names)

    def accuracy(names):
        right = sum(report[n]["confusion"][0][0] + report[n]["confusion"][1][1] for n in names)
        return right / sum(len(split[n]) for n in names)

    assert accuracy(["train"]) > majority(["train"]) + 0.3
    assert accuracy(["validation", "test"]) > majority(["validation", "test"]) + 0.1
    assert (spam_run / "out" / "curves.png").stat().st_size > 0
    model = fs.load_classifier(spam_run / "out" / "classifier.pt")
    assert model.lm_head.out_features == 2 and model.config.n_embd == 64
    text = "You won a free cruise, call now"
    r = run_script("finetune_spam.py", "--classify", text, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 0, r.stderr
    label, prob = r.stdout.split()
    ids = torch.tensor([Tokenizer().encode(text)])
    with torch.no_grad():
        probs = torch.softmax(fs.classify(model, ids, torch.tensor([ids.size(1)])), -1)[0]
    assert label == fs.LABELS[int(probs.argmax())] and float(prob) == pytest.approx(probs.max().item(), abs=1e-3)


def test_spam_seeds_one_folder_each_then_the_summary(tmp_path):
    spam_sample(tmp_path)
    earlier = tmp_path / "out" / "seed5" / "classifier.pt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run")
    args = ["--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out", "--epochs", "1", "--lr", "1e-3",
            "--seeds", "3,5", *SPAM_TINY]
    r = run_script("finetune_spam.py", *args, cwd=tmp_path)
    assert r.returncode == 1 and "out/seed5/classifier.pt is from an earlier run" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "seed3").exists()  # refused before the first seed trained
    r = run_script("finetune_spam.py", *args, "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "seeds.json").read_text())
    runs = {seed: json.loads((tmp_path / "out" / f"seed{seed}" / "metrics.json").read_text()) for seed in (3, 5)}
    assert list(summary["seeds"]) == ["3", "5"] and summary["args"]["seeds"] == [3, 5]
    for seed, run in runs.items():
        assert run["args"]["seed"] == seed and (tmp_path / "split" / f"test-seed{seed}.tsv").is_file()
        row = summary["seeds"][str(seed)]
        assert row["test_accuracy"] == run["test"]["accuracy"] and row["val_loss"] == run["validation"]["loss"]
        assert row["cpu_s"] == run["time"]["cpu_s"] > 0 and row["wall_s"] == run["time"]["wall_s"] > 0
    accuracies = [run["test"]["accuracy"] for run in runs.values()]
    assert summary["mean"]["test_accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert summary["worst"]["test_accuracy"] == min(accuracies)
    assert summary["std"]["test_accuracy"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / math.sqrt(2))
    assert "| **worst** |" in r.stdout and fs.load_classifier(earlier).lm_head.out_features == 2


def test_spam_patience_stops_and_pool_is_kept(tmp_path):
    spam_sample(tmp_path)
    # lr 0: the validation loss never falls after epoch 1, so patience 2 stops after epoch 3 of 5
    r = run_script("finetune_spam.py", "--data", "sample.tsv", "--split-dir", "split", "--out-dir", "out", "--epochs", "5",
                   "--patience", "2", "--lr", "0", "--pool", "mean", "--label-smoothing", "0.1", "--grad-clip", "1",
                   *SPAM_TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3] and report["best_epoch"] == 1
    assert fs.load_classifier(tmp_path / "out" / "classifier.pt").pool == "mean"


def test_spam_seeds_flag_is_checked(tmp_path):
    r = run_script("finetune_spam.py", "--seeds", "0-4,4", cwd=tmp_path)  # seed 4 twice
    assert r.returncode == 2 and r.stderr.startswith("error: argument --seeds: must name each seed once"), r.stderr
    assert fs.seed_list("0-2,7") == [0, 1, 2, 7]


def test_spam_text_longer_than_context(spam_run):
    r = run_script("finetune_spam.py", "--classify", "free prize " * 200, "--out-dir", "out", cwd=spam_run)
    assert r.returncode == 1 and "longer than the model's context (300)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--classify", "hello", "--out-dir", "nowhere"], "no saved classifier at nowhere/classifier.pt"),
    (["--data", "missing.tsv"], "missing.tsv not found"),
    (["--data", "bad.tsv"], "bad.tsv line 2 is not 'ham|spam<TAB>text'"),
    (["--data", "ham-only.tsv"], "has no spam messages"),
    (["--data", str(SPAM_DATA), "--trainable-blocks", "3", *SPAM_TINY], "--trainable-blocks 3: give 'all' or a number from 0 to 2"),
])
def test_spam_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "bad.tsv").write_text("ham\tfine\nthis line has no label\n", encoding="utf-8")
    (tmp_path / "ham-only.tsv").write_text("ham\tone\nham\ttwo\n", encoding="utf-8")
    r = run_script("finetune_spam.py", *args, "--split-dir", "split", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# =============================================================================
# finetune_instruct.py: prompt, batches, LoRA, training, the Ollama judge


INSTRUCT_DATA = SHARED / "instruction-data.json"
EOT = 50256


def instruct_tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=EOT + 1, n_ctx=64, n_layer=2, n_head=4, n_embd=32))


# -----------------------------------------------------------------------------
# Prompt and data


def test_instruct_format_prompt_is_the_alpaca_text():
    head = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nRewrite the sentence in passive voice.")
    with_input = {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal."}
    assert format_prompt(with_input) == head + "\n\n### Input:\nThe chef cooked the meal.\n\n### Response:\n"
    assert format_prompt({**with_input, "input": ""}) == head + "\n\n### Response:\n"
    assert format_prompt({"instruction": with_input["instruction"]}) == head + "\n\n### Response:\n"


def test_instruct_split_of_the_real_data_is_the_books():
    """Chapter 7's split in file order: the first 935 train, the next 110 test, the last 55 validate."""
    entries = load_entries(INSTRUCT_DATA)
    train, val, test = split(entries)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]


# -----------------------------------------------------------------------------
# Batches


def test_instruct_collate_masks_token_by_token():
    batch = [([1, 2, 3, 4, EOT], 3), ([5, 6, EOT], 1)]  # (ids ending with <|endoftext|>, prompt length)
    inputs, targets = collate(batch)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, EOT, EOT]]
    assert targets.tolist() == [[2, 3, 4, EOT], [6, EOT, IGNORE, IGNORE]]  # first end-of-text kept, padding ignored
    _, masked = collate(batch, mask_prompt=True)
    assert masked.tolist() == [[IGNORE, IGNORE, 4, EOT], [6, EOT, IGNORE, IGNORE]]  # only answer tokens count
    inputs, targets = collate(batch, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, EOT]]
    assert targets.tolist() == [[IGNORE, IGNORE, 4], [6, EOT, IGNORE]]


def instruct_book_collate(batch, pad_token_id=EOT, ignore_index=-100, allowed_max_length=None):
    """Raschka's custom_collate_fn (chapter 7), as printed in the book: the reference."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_instruct_collate_of_real_entries_matches_the_book_and_masks_the_prompt():
    tok = Tokenizer()
    entries = load_entries(INSTRUCT_DATA)[:8]
    batch = [encode(tok, e) for e in entries]
    for entry, (ids, prompt_len) in zip(entries, batch):
        assert tok.decode(ids[:prompt_len]) == format_prompt(entry)
        assert tok.decode(ids[prompt_len:]) == entry["output"] + "<|endoftext|>"
    book = [tok.encode(format_prompt(e) + e["output"]) for e in entries]
    for max_length in (None, 40):
        inputs, targets = collate(batch, max_length=max_length)
        ref_inputs, ref_targets = instruct_book_collate(book, allowed_max_length=max_length)
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
    _, masked = collate(batch, mask_prompt=True)
    for row, (entry, (ids, prompt_len)) in enumerate(zip(entries, batch)):
        kept = [t for t in masked[row].tolist() if t != IGNORE]
        assert tok.decode(kept) == entry["output"] + "<|endoftext|>"  # exactly the answer and one end-of-text
        assert masked[row, prompt_len - 1] == ids[prompt_len]  # the last prompt position predicts the answer


# -----------------------------------------------------------------------------
# LoRA


def instruct_logits(state, x):
    model = instruct_tiny_gpt()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)[0]


def test_instruct_lora_trains_only_the_low_rank_matrices_and_merges_exactly():
    model = instruct_tiny_gpt()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    rank, alpha = 4, 8.0
    add_lora(model, rank, alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, L = 32, 2  # per block: c_attn (C -> 3C), attn c_proj (C -> C), c_fc (C -> 4C), mlp c_proj (4C -> C)
    assert trainable == L * rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    x = torch.randint(0, EOT, (2, 16))
    model.eval()
    with torch.no_grad():  # B starts at zero: the wrapped model is the pretrained one
        assert torch.equal(model(x)[0], instruct_logits(frozen, x))
    model.train()
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(lora) == 4 * L
    assert all(m.B.abs().sum() > 0 for m in lora.values())  # the update really trained
    state = model.state_dict()
    for key, value in frozen.items():  # every pretrained weight, bit for bit
        module, leaf = key.rsplit(".", 1)
        assert torch.equal(state[f"{module}.linear.{leaf}" if module in lora else key], value), key

    model.eval()
    with torch.no_grad():
        unmerged = model(x)[0]
        expected = {f"{n}.weight": m.linear.weight + (m.B @ m.A) * (alpha / rank) for n, m in lora.items()}
        merge_lora(model)
        merged = model(x)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(frozen)  # a plain GPT again
    for key, weight in expected.items():
        assert torch.equal(model.state_dict()[key], weight), key
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - instruct_logits(frozen, x)).abs().max() > 1e-3  # and it differs from the start


# -----------------------------------------------------------------------------
# The whole training path: tiny model from scratch, real data, a few steps.

INSTRUCT_TINY = ("--init-from", "scratch", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--data", INSTRUCT_DATA,
                 "--batch-size", 4, "--eval-batches", 1, "--max-new-tokens", 3, "--lr", 1e-3)


def test_instruct_lora_run_saves_a_plain_checkpoint_plot_and_test_answers(tmp_path):
    out = tmp_path / "instruct.pt"
    r = run_script("finetune_instruct.py", *INSTRUCT_TINY, "--lora-rank", 4, "--lora-alpha", 8, "--mask-prompt", "--max-length", 128,
                        "--max-steps", 3, "--eval-interval", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "935 train, 55 validation, 110 test" in r.stdout
    C, L, V = 64, 2, 50257
    lora = L * 4 * (4 * C + 2 * C + 5 * C + 5 * C)
    total = V * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C + lora  # + the LoRA matrices
    assert f"trainable parameters: {lora:,} of {total:,}" in r.stdout
    assert "step 2: train loss" in r.stdout and "step 3: train loss" in r.stdout  # every interval and the last step
    model = GPT.from_pretrained(str(out))  # loads like any checkpoint: LoRA is merged away
    assert (model.config.n_layer, model.config.n_embd) == (2, 64)
    assert torch.load(out, weights_only=True)["step"] in (2, 3)
    assert (tmp_path / "instruct-loss.png").stat().st_size > 0
    responses = json.loads((tmp_path / "instruct-responses.json").read_text())
    _, _, test = split(load_entries(INSTRUCT_DATA))
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in responses] == test
    assert all(isinstance(e["model_response"], str) for e in responses)
    assert not list(tmp_path.glob("*.tmp"))


def test_instruct_full_finetuning_lowers_the_loss_and_answers_greedily(tmp_path):
    out = tmp_path / "full.pt"
    r = run_script("finetune_instruct.py", *INSTRUCT_TINY, "--max-steps", 8, "--eval-interval", 4, "--max-length", 96, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "full fine-tuning" in r.stdout and "(100.00%)" in r.stdout
    val = [float(line.split("val loss ")[1].split(" ")[0].rstrip(",")) for line in r.stdout.splitlines()
           if line.startswith("step ")]
    assert len(val) == 2 and val[1] < val[0]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 8 and abs(ckpt["val_loss"] - val[1]) < 1e-3
    # The saved answers (in batches of 4 prompts of different lengths) are each prompt's own greedy
    # continuation by the saved model, cut at end-of-text.
    model, tok = GPT.from_pretrained(str(out)), Tokenizer()
    for entry in json.loads((tmp_path / "full-responses.json").read_text())[:6]:
        prompt = torch.tensor([tok.encode(format_prompt(entry))])
        with torch.no_grad():
            new = []
            for _ in range(3):  # plain argmax over the full sequence, no KV cache, no padding
                next_id = model(torch.cat([prompt, torch.tensor([new], dtype=torch.long)], dim=1))[0][0, -1].argmax().item()
                if next_id == EOT:
                    break
                new.append(next_id)
        assert entry["model_response"] == tok.decode(new).strip()


@pytest.mark.parametrize("args, message", [
    (("--data", "missing.json"), "missing.json not found: expected a JSON list of entries with instruction, output"),
    (("--max-length", 2000), "--max-length 2000 is longer than the model's context window (1024)"),
])
def test_instruct_bad_input_is_one_clear_line(tmp_path, args, message):
    r = run_script("finetune_instruct.py", *INSTRUCT_TINY, "--out", tmp_path / "x.pt", *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_instruct_malformed_data_names_the_entry(tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    r = run_script("finetune_instruct.py", *INSTRUCT_TINY, "--data", data, "--out", tmp_path / "x.pt")
    assert r.returncode == 1 and "entry 1 needs the string fields instruction, output" in r.stderr


# -----------------------------------------------------------------------------
# The judge, against a fake Ollama server on 127.0.0.1 that speaks /api/chat.


class InstructFakeOllama(BaseHTTPRequestHandler):
    """POST /api/chat -> {"message": {"role": "assistant", "content": next reply}, "done": true};
    a model other than the server's gets Ollama's 404 {"error": "model '...' not found"}."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((self.path, body))
        if body["model"] != server.model:
            status, reply = 404, {"error": f"model '{body['model']}' not found"}
        else:
            status, reply = 200, {"model": server.model, "message": {"role": "assistant", "content": server.replies.pop(0)},
                                  "done": True}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def instruct_ollama(serve):
    return serve(InstructFakeOllama, model="llama3", replies=[], requests=[])


def instruct_responses(tmp_path, n):
    path = tmp_path / "responses.json"
    entries = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "now", "output": f"{i}.",
                "model_response": f"answer {i}"} for i in range(n)]
    path.write_text(json.dumps(entries))
    return path, entries


def instruct_judge(path, server, *args):
    return run_script("finetune_instruct.py", "--evaluate", path, "--ollama-url", server.url, *args, timeout=60)


def test_instruct_judge_scores_each_answer_and_writes_the_mean(tmp_path, instruct_ollama):
    path, entries = instruct_responses(tmp_path, 3)
    instruct_ollama.replies = ["85", " 40\n", "100."]
    r = instruct_judge(path, instruct_ollama, "--seed", 7)
    assert r.returncode == 0, r.stderr
    assert "entry 0: score 85" in r.stdout and "entry 1: score 40" in r.stdout and "entry 2: score 100" in r.stdout
    assert "mean score 75.00 over 3 entries" in r.stdout
    assert [e["score"] for e in json.loads(path.read_text())] == [85, 40, 100]
    assert len(instruct_ollama.requests) == 3
    for (url_path, body), entry in zip(instruct_ollama.requests, entries):
        assert url_path == "/api/chat"
        assert body["model"] == "llama3" and body["stream"] is False
        assert body["options"] == {"temperature": 0, "seed": 7}
        [message] = body["messages"]
        assert message["role"] == "user"
        for text in (format_prompt(entry), entry["output"], entry["model_response"], "0 to 100"):
            assert text in message["content"]


def test_instruct_judge_retries_a_non_number_then_counts_it_failed_not_zero(tmp_path, instruct_ollama):
    path, _ = instruct_responses(tmp_path, 2)
    tries = 1 + JUDGE_RETRIES
    instruct_ollama.replies = ["Great answer!"] * tries + ["Score: none", "50"]
    r = instruct_judge(path, instruct_ollama)
    assert r.returncode == 0, r.stderr
    assert f"entry 0: the judge's reply 'Great answer!' is not a score after {tries} tries: counted as failed" in r.stdout
    assert "entry 1: score 50" in r.stdout
    assert "mean score 50.00 over 1 entries (1 failed, not counted)" in r.stdout
    assert [e["score"] for e in json.loads(path.read_text())] == [None, 50]
    assert len(instruct_ollama.requests) == tries + 2
    retry = instruct_ollama.requests[1][1]["messages"]  # the retry shows the judge its own reply
    assert [m["role"] for m in retry] == ["user", "assistant", "user"] and retry[1]["content"] == "Great answer!"


def test_instruct_judge_with_no_score_at_all_fails(tmp_path, instruct_ollama):
    path, _ = instruct_responses(tmp_path, 1)
    instruct_ollama.replies = ["101"] * (1 + JUDGE_RETRIES)  # out of range is not a score either
    r = instruct_judge(path, instruct_ollama)
    assert r.returncode == 1 and "the judge gave no score to any of the 1 entries" in r.stderr
    assert json.loads(path.read_text())[0]["score"] is None


def test_instruct_judge_names_a_missing_model(tmp_path, instruct_ollama):
    path, _ = instruct_responses(tmp_path, 1)
    r = instruct_judge(path, instruct_ollama, "--judge-model", "nope")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has no model 'nope' (model 'nope' not found): run `ollama pull nope`" in r.stderr


def test_instruct_judge_says_when_the_server_is_unreachable(tmp_path):
    path, _ = instruct_responses(tmp_path, 1)
    port = free_port()
    r = run_script("finetune_instruct.py", "--evaluate", path, "--ollama-url", f"http://127.0.0.1:{port}", timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot reach Ollama at http://127.0.0.1:{port}: start it with `ollama serve`" in r.stderr


# =============================================================================
# Off the happy path: every bad input is one line (exit 1; 2 for a flag argparse rejects), no
# traceback, and the files that were there before are byte-identical afterwards.


def one_line_error(r, code=1):
    """The single 'error: ...' line of a run that must have failed cleanly."""
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.strip().splitlines() if "%|" not in line]  # less a progress bar before it
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step train.py run on the real the-verdict.txt: (data, out-dir, its arguments)."""
    tmp = tmp_path_factory.mktemp("trained")
    data, args = train_verdict(tmp), ("--max-iters", 8, "--eval-interval", 4, "--batch-size", 2)
    train_run(data, tmp / "out", *args)
    return data, tmp / "out", args


def test_bad_rerun_of_train_never_replaces_a_trained_model(trained, run_main):
    data, out, args = trained
    before = snapshot(out)
    for extra in ((), ("--seed", 7), ("--max-iters", 3)):
        line = one_line_error(run_main("train.py", *train_args(data, out, *args, *extra)))
        assert "ckpt.pt is from an earlier run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_bad_resume_refuses_fixed_flags_and_records_the_changed_ones(trained, tmp_path, run_main):
    data, out, args = trained
    out = Path(shutil.copytree(out, tmp_path / "out"))
    before = snapshot(out)
    for flag, value in (("--n-layer", 3), ("--context-length", 64), ("--seed", 5), ("--data", tmp_path / "x.txt")):
        line = one_line_error(run_main("train.py", "--out-dir", out, "--resume", flag, value))
        assert f"{flag} {value} differs from the checkpoint's" in line and "cannot change on --resume" in line
    assert snapshot(out) == before
    # best.pt holds a better model than the checkpoint knows of (written after ckpt.pt): it stays
    best = train_load(out / "best.pt")
    best["val_loss"] = 0.5
    torch.save(best, out / "best.pt")
    best_bytes = (out / "best.pt").read_bytes()
    run = run_script("train.py", "--out-dir", out, "--resume", "--max-iters", 12, "--lr", "1e-3", "--dropout", 0, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = train_load(out / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["max_iters"] == 12
    assert ckpt["config"]["dropout"] == 0 and ckpt["args"]["n_layer"] == 2  # what the model really is
    assert ckpt["best_val"] == 0.5 and (out / "best.pt").read_bytes() == best_bytes


def test_bad_rerun_of_the_finetuning_scripts_keeps_their_output(tmp_path, run_main):
    spam_out, instruct_out = tmp_path / "spam", tmp_path / "instruct.pt"
    spam_out.mkdir()
    (spam_out / "classifier.pt").write_bytes(b"an earlier classifier")
    instruct_out.write_bytes(b"an earlier model")
    before = snapshot(tmp_path)
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", SPAM_DATA, "--split-dir", tmp_path / "s",
                                   "--out-dir", spam_out))
    assert "classifier.pt is from an earlier run" in line and "--overwrite" in line
    line = one_line_error(run_main("finetune_instruct.py", *INSTRUCT_TINY, "--out", instruct_out))
    assert "instruct.pt is from an earlier run" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script, args, message", [
    ("train", ["--max-iters", -3], "argument --max-iters: must be an integer >= 0, not -3"),
    ("train", ["--epochs", -1], "argument --epochs: must be an integer >= 1, not -1"),
    ("train", ["--batch-size", 0], "argument --batch-size: must be an integer >= 1, not 0"),
    ("train", ["--grad-accum", 0], "argument --grad-accum: must be an integer >= 1, not 0"),
    ("train", ["--context-length", 0], "argument --context-length: must be an integer >= 1, not 0"),
    ("train", ["--eval-interval", -1], "argument --eval-interval: must be an integer >= 0, not -1"),
    ("train", ["--lr", "nan"], "argument --lr: must be a number >= 0, not nan"),
    ("train", ["--dropout", 1.5], "argument --dropout: must be a number from 0 to 1, not 1.5"),
    ("train", ["--n-head", "three"], "argument --n-head: must be an integer >= 1, not three"),
    ("sample", ["--temperature", "nan"], "argument --temperature: must be a number >= 0, not nan"),
    ("sample", ["--temperature", "inf"], "argument --temperature: must be a number >= 0, not inf"),
    ("sample", ["--temperature", -1], "argument --temperature: must be a number >= 0, not -1"),
    ("sample", ["--top-k", -1], "argument --top-k: must be an integer >= 0, not -1"),
    ("sample", ["--top-p", 1.5], "argument --top-p: must be a number from 0 to 1, not 1.5"),
    ("sample", ["--num-samples", 0], "argument --num-samples: must be an integer >= 1, not 0"),
    ("finetune_spam", ["--epochs", 0], "argument --epochs: must be an integer >= 1, not 0"),
    ("finetune_spam", ["--batch-size", 0], "argument --batch-size: must be an integer >= 1, not 0"),
    ("finetune_instruct", ["--lora-rank", -1], "argument --lora-rank: must be an integer >= 0, not -1"),
    ("finetune_instruct", ["--max-steps", -5], "argument --max-steps: must be an integer >= 0, not -5"),
])
def test_bad_numbers_are_refused_before_any_work(script, args, message, run_main, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    r = run_main(f"{script}.py", *args)
    assert r.returncode == 2 and r.stderr == f"error: {message} (see {script}.py --help)\n"
    assert not list(tmp_path.iterdir())


def test_bad_sizes_and_devices_are_one_line(trained, tmp_path, run_main, monkeypatch):
    data, _, _ = trained
    monkeypatch.chdir(tmp_path)
    for script in ("train.py", "finetune_spam.py", "finetune_instruct.py"):
        line = one_line_error(run_main(script, "--init-from", "scratch", "--n-head", 3, "--n-embd", 64))
        assert line == "error: --n-embd 64 must be a multiple of --n-head 3 (the heads split the width)", script
    assert not list(tmp_path.iterdir())  # before any work: no download was tried, nothing written
    line = one_line_error(run_main("train.py", *train_args(data, tmp_path / "o", "--device", "cuda")))
    assert "--device cuda: this machine has no CUDA device" in line
    assert not (tmp_path / "o").exists()


def test_bad_generate_arguments_raise_clear_errors():
    model, idx = tiny_model(), torch.randint(0, TINY["vocab_size"], (1, 4))
    for kwargs, message in (({"temperature": math.nan}, "temperature must be a finite number >= 0"),
                            ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
                            ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
                            ({"top_k": 0}, "top_k must be >= 1"), ({"top_k": -1}, "top_k must be >= 1"),
                            ({"top_p": 1.5}, "top_p in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 3, **kwargs)
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(idx[:, :0], 3)


def test_bad_out_dir_is_one_line_before_any_work(trained, tmp_path, monkeypatch):
    data, _, _ = trained
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line_error(run_script("train.py", *train_args(data, tmp_path / "a-file" / "out"), timeout=120))
    assert "cannot write to" in line and "a-file/out" in line
    # a read-only folder (root writes anywhere, so the refusal is simulated where the probe writes)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if ".write-test-" in str(path) else real_open(path, *a, **k))
    with pytest.raises(UserError, match="cannot write to .*read-only \\(Permission denied\\)"):
        common.check_out_files([str(tmp_path / "read-only" / "ckpt.pt")], overwrite=False)
    # a half-written checkpoint left by a kill -9 is cleared on the next start
    monkeypatch.undo()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt.tmp").write_bytes(b"half")
    common.check_out_files([str(tmp_path / "o" / "ckpt.pt")], overwrite=False)
    assert not (tmp_path / "o" / "ckpt.pt.tmp").exists()


def test_bad_offline_tokenizer_says_what_is_needed(sample_ckpt, tmp_path):
    offline = {**ENV, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}",
               "HTTP_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": ""}
    line = one_line_error(run_script("sample.py", "--model", sample_ckpt[1], cwd=tmp_path, env=offline, timeout=120))
    assert "GPT-2's tokenizer files could not be downloaded" in line and "TIKTOKEN_CACHE_DIR" in line
    # with a downloaded model's encoder.json in models/, the scripts use it offline
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "124M").symlink_to(OPENAI_124M)
    r = run_script("sample.py", "--model", sample_ckpt[1], "--max-new-tokens", 5, cwd=tmp_path, env=offline, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(SAMPLE_PROMPT), r.stderr[-2000:]


def test_bad_files_are_named(tmp_path, run_main):
    hf = hf_twin(tiny_model())
    folder = write_openai_checkpoint(tmp_path / "cut", hf, n_ctx=TINY["n_ctx"])
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])  # an interrupted copy
    line = one_line_error(run_script("sample.py", "--model", folder, timeout=120))  # TensorFlow says nothing either
    assert f"{data} is cut short or damaged (Read less bytes than requested): download it" in line
    (folder / "hparams.json").write_text("{not json")
    line = one_line_error(run_main("sample.py", "--model", folder))
    assert f"{folder / 'hparams.json'} holds no GPT-2 config" in line
    junk = tmp_path / "classifier.pt"  # random bytes: not even a zip
    junk.write_bytes(os.urandom(3000))
    for r in (run_main("sample.py", "--model", junk), run_main("finetune_spam.py", "--out-dir", tmp_path, "--classify", "hi")):
        line = one_line_error(r)
        assert "is not a" in line and "of this project" in line and "weights_only" not in line
    (tmp_path / "latin1.tsv").write_bytes("ham\tcafé\n".encode("latin-1"))
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "café", "output": "x"}]'.encode("latin-1"))
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", tmp_path / "latin1.tsv", "--out-dir", tmp_path / "s"))
    assert f"{tmp_path / 'latin1.tsv'} is not UTF-8 text" in line
    line = one_line_error(run_main("finetune_instruct.py", *INSTRUCT_TINY, "--data", tmp_path / "latin1.json",
                                   "--out", tmp_path / "i.pt"))
    assert f"{tmp_path / 'latin1.json'} is not a UTF-8 JSON file" in line


def test_bad_spam_data_too_small_to_split(tmp_path, run_main):
    (tmp_path / "two.tsv").write_text("ham\thello\nspam\tWIN NOW\n", encoding="utf-8")
    line = one_line_error(run_main("finetune_spam.py", *SPAM_TINY, "--data", tmp_path / "two.tsv", "--out-dir", tmp_path / "o",
                                     "--split-dir", tmp_path / "s"))
    assert "2 balanced messages (1 spam) are too few to split" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


class NullContentOllama(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"message": {"role": "assistant", "content": None}, "done": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_bad_judge_reply_without_content(tmp_path, serve):
    path, _ = instruct_responses(tmp_path, 1)
    before = path.read_bytes()
    line = one_line_error(instruct_judge(path, serve(NullContentOllama)))
    assert "did not answer with Ollama's chat JSON" in line
    assert path.read_bytes() == before


def test_bad_download_leaves_no_empty_model_folder(tmp_path):
    r = run_script("download_weights.py", "--models-dir", tmp_path, "--base-url", f"http://127.0.0.1:{free_port()}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: could not download") and "cannot connect" in lines[-1]
    assert len(lines) == 3 and all(len(line) < 60 for line in lines[:2])  # a short line per retry, not the socket error
    assert not (tmp_path / "124M").exists()


def test_plot_of_single_points_is_not_blank(tmp_path):
    import matplotlib.image

    empty = common.plot_curves(str(tmp_path / "empty.png"), "epoch", {"loss": {"train": ([], [])}})
    one = common.plot_curves(str(tmp_path / "one.png"), "epoch", {"loss": {"train": ([1], [0.5]), "val": ([1], [0.7])}})
    a, b = matplotlib.image.imread(empty), matplotlib.image.imread(one)
    assert a.shape == b.shape and (a != b).any(axis=-1).sum() > 20  # the two markers are drawn



# =============================================================================
# bench.py: runs on a tiny config and prints every row (no timing is checked)


BENCH_TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--batch-size", "2", "--seq-len", "16",
              "--prompt-len", "8", "--new-tokens", "12", "--batch-new-tokens", "4", "--prefill", "32", "--reps", "1", "--warmup", "0"]
BENCH_ROWS = [  # (start of the row's label, whether transformers' figure and the ratio are shown)
    ("float32 matmul peak", False), ("memory read bandwidth", False), ("matrix-vector product, 1 GiB weight (out, in)", False),
    ("matrix-vector product, the same weight stored (in, out)", False), ("generation bound", False),
    ("training step", True), ("training, GFLOP/s", True),
    ("generation, greedy, 8 + 12 tokens", True), ("generation, greedy, share of the bandwidth bound", True),
    ("generation, greedy: ours as loaded (block matrices (in, out)) over them (out, in)", False),
    ("generation, top-k 50", True), ("generation, greedy, no KV cache", False), ("KV cache speed-up", False),
    ("generation, greedy, batch 1 x (8 + 4)", True), ("generation, greedy, batch 4", True),
    ("generation, greedy, batch 8", True), ("generation, greedy, batch 16", True),
    ("generation, greedy, 8 prompts of 2 to 16 tokens in one batch, + 4 each", True), ("the same 8 prompts", False),
    ("prefill, 32 tokens", True),
    ("loading 14 MB of weights from the same Hugging Face folder", True), ("loading, peak RSS over the process", True),
    ("loading, ours from a .pt of ours", False), ("loading, ours in a process that has not imported torch._dynamo", False),
    ("training step 2 x 16, peak RSS", True), ("greedy generation, peak RSS", True),
]


def bench_run(args, tmp_path):
    return run_script("bench.py", *args, cwd=tmp_path, env={**ENV, "TMPDIR": str(tmp_path)})


def test_bench_prints_every_row(tmp_path):
    out = bench_run(BENCH_TINY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in r] for r in rows[2:]]  # after the header and its rule
    assert len(rows) == len(BENCH_ROWS), out.stdout
    number = re.compile(r"^\d+(\.\d+)?(x|%)?( \(\d+(\.\d+)?(x|%)\))?$")
    for (label, compared), (what, ours, theirs, ratio) in zip(BENCH_ROWS, rows):
        assert what.startswith(label), (label, what)
        assert number.match(ours), (what, ours)
        if compared:
            assert number.match(theirs) and re.match(r"^\d+\.\d\dx$", ratio), (what, theirs, ratio)
        else:
            assert theirs == ratio == "", (what, theirs, ratio)
    # The Hugging Face folder and the .pt it wrote (and keeps in the temp folder) hold the very weights it benchmarked.
    (folder,) = tmp_path.glob("gpt2-bench-2x4x64-seed0")
    ours, _ = bench.make_models(2, 4, 64, seed=0)
    for kind in ("hf", "model.pt"):
        loaded = GPT.from_pretrained(str(folder / kind))
        for name, p in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), (kind, name)


def test_bench_generation_only_stops_after_batch_1(tmp_path):
    out = bench_run([*BENCH_TINY, "--generation-only"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    labels = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")][2:]
    expected = [label for label, _ in BENCH_ROWS[:BENCH_ROWS.index(("generation, top-k 50", True)) + 1] if "training" not in label]
    assert len(labels) == len(expected) and all(l.startswith(e) for l, e in zip(labels, expected)), labels
    assert not list(tmp_path.glob("gpt2-bench-*"))  # no checkpoints written for the loading rows


def test_bench_models_compute_the_same():
    ours, theirs = bench.make_models(2, 4, 64, seed=1)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    no_autocast = bench.autocast_for("cpu")
    a = bench.generate(ours, x[:1], 10, None, no_autocast)
    assert torch.equal(a, bench.generate(theirs, x[:1], 10, None, no_autocast))
    assert torch.equal(a, bench.generate_without_cache(ours, x[:1], 10, no_autocast))
    assert bench.generate(theirs, x[:1], 10, 5, no_autocast).shape == (1, 30)  # top-k never stops early
    prompts = [x[0, :n].tolist() for n in (3, 20, 9)]
    assert bench.generate_ragged(ours, prompts, 8, no_autocast) == bench.generate_ragged(theirs, prompts, 8, no_autocast)


def test_bench_int8_perplexity_and_rows(tmp_path, run_main):
    import bench_int8

    model = tiny_model(n_ctx=16)
    ids = torch.randint(0, TINY["vocab_size"], (40,)).tolist()  # windows of 17, 17 and 8 tokens, sharing their ends
    hf = hf_twin(model)
    with torch.no_grad():  # each window: 16 (or fewer) inputs, each predicting the token after it
        nll = sum(F.cross_entropy(hf(torch.tensor([ids[i:i + 16]])).logits[0, :len(ids[i + 1:i + 17])],
                                  torch.tensor(ids[i + 1:i + 17]), reduction="sum").item() for i in (0, 16, 32))
    assert bench_int8.perplexity(model, ids) == pytest.approx(math.exp(nll / 39), rel=1e-5)
    q = bench_int8.quantized(model)
    assert type(q.transformer.h[0].mlp.c_fc).__name__ == "Linear" and q.transformer.h[0].mlp.c_fc.__module__.endswith("dynamic.modules.linear")
    assert bench_int8.perplexity(q, ids) == pytest.approx(bench_int8.perplexity(model, ids), rel=0.05)  # close, not equal
    assert bench_int8.perplexity(q, ids) != bench_int8.perplexity(model, ids)
    path = str(tmp_path / "tiny.pt")
    save_atomic(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=32)).checkpoint(), path)
    (tmp_path / "held.txt").write_text((SHARED / "the-verdict.txt").read_text(encoding="utf-8")[:2000], encoding="utf-8")
    r = run_main("bench_int8.py", "--model", path, "--text", tmp_path / "held.txt", "--n-layer", 1, "--n-head", 2,
                 "--n-embd", 32, "--new-tokens", 3, "--reps", 1)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].split(" ")[1] for row in rows] == ["perplexity", "greedy"]
    assert all(re.search(r"\| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+x \|$", row) for row in rows), rows


def test_bench_rejects_bad_size(tmp_path):
    out = bench_run(["--n-embd", "65", "--n-head", "4"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "error: --n-embd 65 is not a multiple of --n-head 4"


# =============================================================================
# explore.py: weights, attention, embeddings and predictions, each against a reference


def explore_png_ok(path):
    """A real PNG that matplotlib reads back, with more than a few colours in it."""
    import matplotlib.pyplot as plt
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = plt.imread(str(path))
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and len(colours) > 20, (path, pixels.shape, len(colours))


def explore_parameters(n_layer, n_head, n_embd, vocab_size=50257, n_ctx=1024):
    """GPT-2's parameter count by hand: embeddings, per block two layer norms, q/k/v, the
    attention projection and the two feed-forward layers, then ln_f; the head is wte."""
    C = n_embd
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return vocab_size * C + n_ctx * C + n_layer * block + 2 * C


def test_explore_weights_of_the_real_124M_index(monkeypatch, capsys):
    """From the index alone (no data file): every tensor with OpenAI's name and shape, the real total.
    (main() in this process: TensorFlow is loaded once.)"""
    monkeypatch.setattr(sys, "argv", ["explore.py", "--model", str(OPENAI_124M), "--weights"])
    explore.main()
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("transformer.")]
    assert {openai: tuple(map(int, shape.split("x"))) for _, openai, _, shape, _ in rows} == real_index()
    counts = [int(n.replace(",", "")) for *_, n in rows]
    assert sum(counts) == 124_439_808 == explore_parameters(12, 12, 768)  # GPT-2 124M, the tied head once
    assert "total: 124,439,808 parameters" in stdout
    blocks = {name: int(n.replace(",", "")) for name, n in (line.split() for line in lines if line.startswith("  h."))}
    assert len(blocks) == 12 and set(blocks.values()) == {explore_parameters(1, 12, 768, 0, 0) - 2 * 768}
    sizes = {line.split()[0]: [int(x.replace(",", "")) for x in line.split()[1:]]
             for line in lines if re.match(r"^  \d+M ", line)}
    assert sizes == {name: [L, H, C, explore_parameters(L, H, C)] for name, (L, H, C) in
                     {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280), "1558M": (48, 25, 1600)}.items()}


def test_explore_weights_of_our_checkpoint(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.pt"
    save_atomic(model.checkpoint(), str(path))
    tensors = explore.model_tensors(str(path))
    assert [name for name, _ in tensors] == [k for k in model.state_dict() if k != "lm_head.weight"]
    assert sum(math.prod(shape) for _, shape in tensors) == explore_parameters(2, 4, 32, 96, 64)


def test_explore_attention_weights_are_causal_sum_to_1_and_equal_q_dot_k():
    """gpt2.py's kept weights against softmax(q kᵀ / sqrt(hs)) from each layer's own q and k,
    taken from c_attn(ln_1(x)) on the block's input."""
    model = tiny_model(seed=5)
    ids = torch.randint(0, TINY["vocab_size"], (20,)).tolist()
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in model.transformer.h]
    weights = explore.attention_weights(model, ids)
    for hook in hooks:
        hook.remove()
    L, H, T, C = TINY["n_layer"], TINY["n_head"], len(ids), TINY["n_embd"]
    assert weights.shape == (L, H, T, T)
    assert not any(block.attn.keep_weights for block in model.transformer.h)
    later = torch.ones(T, T, dtype=torch.bool).triu(1)  # key after query
    assert (weights[..., later] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(L, H, T))
    with torch.no_grad():
        for block, x, w in zip(model.transformer.h, inputs, weights):
            q, k, _ = block.attn.c_attn(block.ln_1(x))[0].split(C, dim=-1)
            q, k = (t.view(T, H, C // H).transpose(0, 1) for t in (q, k))  # (H, T, hs)
            scores = (q @ k.transpose(1, 2) / math.sqrt(C // H)).exp() * ~later
            torch.testing.assert_close(w, scores / scores.sum(-1, keepdim=True))
    assert weights.std() > 0.05  # not uniform: the comparison means something
    with pytest.raises(UserError, match="--layer 2 --head 0: the model has layers 0-1 and heads 0-3"):
        explore.show_attention(model, Tokenizer(), "a b c", 2, 0, "unused")


def explore_brute_force(wte, vector, k, exclude):
    """Cosine similarity to every row, one at a time in float64, sorted."""
    sims = []
    v = vector.double()
    for i, row in enumerate(wte.double()):
        if i not in exclude:
            sims.append(((row @ v / (row.norm() * v.norm())).item(), i))
    return [(i, s) for s, i in sorted(sims, reverse=True)[:k]]


def test_explore_neighbors_and_analogy_equal_brute_force():
    wte = tiny_model(seed=6).transformer.wte.weight.detach()
    for vector, exclude in ((wte[7], [7]), (wte[3] - wte[10] + wte[42], [3, 10, 42])):
        found = explore.nearest(wte, vector, 8, exclude)
        expected = explore_brute_force(wte, vector, 8, exclude)
        assert [i for i, _ in found] == [i for i, _ in expected]
        assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert explore.parse_sum("king - man + woman") == [(1, "king"), (-1, "man"), (1, "woman")]


def test_explore_pca_equals_the_covariance_eigenvectors():
    """--words' plane: the two eigenvectors of the covariance with the largest eigenvalues (numpy), up to sign."""
    import numpy as np

    x = tiny_model(seed=9).transformer.wte.weight.detach()[:10]
    xy, share = explore.pca_2d(x)
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending
    expected = centred @ vectors[:, [-1, -2]]
    np.testing.assert_allclose(np.abs(xy.numpy()), np.abs(expected), atol=1e-4)
    np.testing.assert_allclose(share, values[[-1, -2]] / values.sum(), atol=1e-5)


def test_explore_next_token_probabilities_equal_softmax_of_transformers_logits():
    model = tiny_model(seed=7)
    ids = torch.randint(0, TINY["vocab_size"], (30,))
    with torch.no_grad():
        expected = F.softmax(hf_twin(model)(ids[None]).logits[0], dim=-1)
    torch.testing.assert_close(explore.next_token_probabilities(model, ids.tolist()), expected, atol=1e-6, rtol=1e-4)


EXPLORE_TEXT = "Every effort moves you to the end"


@pytest.fixture(scope="module")
def explore_run(tmp_path_factory):
    """Every picture-and-text view at once, on a tiny model with GPT-2's vocabulary."""
    folder = tmp_path_factory.mktemp("explore")
    model = tiny_model(seed=8, vocab_size=50257)
    save_atomic(model.checkpoint(), str(folder / "tiny.pt"))
    r = run_script("explore.py", "--model", folder / "tiny.pt", "--out", folder / "pictures",
                   "--attention", EXPLORE_TEXT, "--layer", 1, "--head", 2, "--neighbors", "king",
                   "--analogy", "king - man + woman", "--words", "king", "queen", "man", "woman",
                   "--next", EXPLORE_TEXT, "--top-k", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    return model, folder / "pictures", r.stdout


def test_explore_script_pictures_are_valid_pngs(explore_run):
    _, pictures, stdout = explore_run
    names = ["attention-layer1-head2.png", "attention-layer1.png", "words.png", "next.png"]
    assert sorted(p.name for p in pictures.iterdir()) == sorted(names)  # no temporary files left
    for name in names:
        assert str(pictures / name) in stdout
        explore_png_ok(pictures / name)


def test_explore_script_prints_brute_force_neighbors_and_transformers_probabilities(explore_run):
    model, _, stdout = explore_run
    tok = Tokenizer()
    wte = model.transformer.wte.weight.detach()
    king, man, woman = (tok.encode(" " + w)[0] for w in ("king", "man", "woman"))
    for title, vector, exclude in (("nearest tokens to ' king'", wte[king], [king]),
                                   ("nearest tokens to king - man + woman", wte[king] - wte[man] + wte[woman],
                                    [king, man, woman])):
        lines = stdout.split(title)[1].splitlines()[1:4]
        expected = explore_brute_force(wte, vector, 3, exclude)
        assert [line.rsplit(None, 1)[0].strip() for line in lines] == [repr(tok.decode([i])) for i, _ in expected]
        assert [float(line.split()[-1]) for line in lines] == pytest.approx([s for _, s in expected], abs=1e-3)

    ids = tok.encode(EXPLORE_TEXT)
    with torch.no_grad():
        reference = hf_twin(model)(torch.tensor([ids]), labels=torch.tensor([ids]))
    probs = F.softmax(reference.logits[0], dim=-1)
    table = stdout.split("top 3 predictions\n")[1].splitlines()[:len(ids)]
    for t, line in enumerate(table):
        top = probs[t].topk(3)
        printed = [float(p) for p in re.findall(r"['\"] ([\d.e+-]+)(?:,|$)", line)]
        assert printed == pytest.approx(top.values.tolist(), rel=1e-3), line
        assert line.index(repr(tok.decode([top.indices[0].item()]))) < line.index(repr(tok.decode([top.indices[2].item()])))
        if t + 1 < len(ids):
            surprisal = float(re.search(r" [\d.e+-]+ +([\d.]+)   ", line).group(1))
            assert surprisal == pytest.approx(-probs[t, ids[t + 1]].log().item(), abs=0.01)
    assert f"loss {reference.loss.item():.3f} nats per token, perplexity {reference.loss.exp().item():.1f}" in stdout


@pytest.mark.parametrize("args, message", [
    (["--neighbors", "Xqzvbtkw"], "error: ' Xqzvbtkw' is 6 tokens"),
    (["--next", "word " * 70], "error: --next: the text is 71 tokens, longer than the model's context window (64)"),
])
def test_explore_bad_input_is_one_clear_line(explore_run, args, message):
    model, pictures, _ = explore_run
    r = run_script("explore.py", "--model", pictures.parent / "tiny.pt", "--out", pictures.parent / "bad", *args)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.strip() == r.stderr.strip().splitlines()[-1]
    assert r.stderr.startswith(message), r.stderr
    assert not (pictures.parent / "bad").exists()
