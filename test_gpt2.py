"""Tests of gpt2.py alone, against references nobody here wrote: tiktoken, Hugging Face transformers'
GPT-2 and OpenAI's own checkpoint index. It imports gpt2.py, those references and the tests' helpers
(tests/helpers.py) only. The real files it reads are where the project's conftest.py finds them."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt2
from gpt2 import GPT, GPTConfig, Tokenizer, size_name
from tests.helpers import (OPENAI_124M, ROOT, TENSORFLOW, TINY, cached_logits, generate_without_cache,
                           hf_twin, ragged_prompts, real_index, tiny_model, write_openai_checkpoint)

# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_known_ids_and_round_trip():
    tok = Tokenizer()
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.eot_id == 50256
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    for text in ["Ünïcödé – “quotes” ½ €", "日本語のテキスト", "emoji 🎉🚀 mixed", "  spaces\n\ttabs  ", ""]:
        assert tok.decode(tok.encode(text)) == text


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
    stepped = cached_logits(model, idx)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


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
    theirs = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(prompts, 15, temperature=0) \
           == [p + row[T:] for p, row in zip(prompts, theirs.tolist())]


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
                torch.testing.assert_close(logits[row, pad[row]:], model(torch.tensor([p]))[0][0], atol=1e-5,
                                           rtol=0)


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


@pytest.mark.parametrize("temperature, top_k, top_p",
                         [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6), (0.9, 8, 0.8)])
def test_sampled_frequencies_follow_the_warped_probabilities(temperature, top_k, top_p):
    """Which tokens survive and with what probability, against transformers' own warpers: the
    frequencies of 40,000 draws per row stay within 5 standard errors of those probabilities."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

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


@TENSORFLOW
def test_expected_variables_equal_the_real_124M_index():
    with open(OPENAI_124M / "hparams.json") as f:
        hp = json.load(f)
    assert (hp["n_layer"], hp["n_head"], hp["n_embd"]) == (12, 12, 768)
    expected = {}
    for name, p in GPT.empty(GPTConfig.from_name("124M")).state_dict().items():
        if name != "lm_head.weight":  # tied to wte: OpenAI stores it once
            shape = tuple(p.shape)
            expected[GPT.openai_name(name)] = ((1, shape[1], shape[0]) if p.dim() == 2 and "h." in name
                                               else shape)
    assert expected == real_index()


@TENSORFLOW
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


def laid_out(p, amd):
    """p is as load_weights lays it out: on an AMD CPU every matrix (out, in) has (in, out) bytes; every
    other weight, and all on other CPUs, contiguous (out, in)."""
    if amd and p.dim() == 2:
        return p.stride() == (1, p.size(0))
    return p.is_contiguous()


def test_contiguous_copies_any_layout_exactly():
    """load_weights' copy in column strips holds torch's own contiguous copy, for a transpose whose width is
    no multiple of the strip, a strided slice, a vector and an already contiguous matrix (returned as is)."""
    m = torch.randn(300, 200)
    for t in (m.t(), m[::2, 1::3], m[:, 5], torch.randn(4, 3, 5).transpose(0, 2)):
        got = gpt2.contiguous(t)
        assert got.is_contiguous() and got.dtype == t.dtype and torch.equal(got, t.contiguous())
    assert gpt2.contiguous(m) is m


@pytest.mark.parametrize("amd", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_splits_one_row_over_the_cores_on_amd_and_equals_nn_linear(monkeypatch, amd, threads):
    """gpt2.Linear is nn.Linear's product: one row on an AMD CPU goes through the split over the cores
    (one bmm, where the cores divide the features), in either layout load_weights stores; any other x,
    or another CPU, goes through nn.Linear's own. Gradients flow through both."""
    monkeypatch.setattr(gpt2, "AMD_CPU", amd)
    bmm_calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or torch.matmul(*a))
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (True, False):
            layer = gpt2.Linear(64, 96, bias=bias)
            for weight in (layer.weight.detach().clone(), layer.weight.detach().t().contiguous().t()):
                layer.weight = nn.Parameter(weight)
                for shape in ((1, 1, 64), (1, 64), (64,), (2, 1, 64), (1, 3, 64)):
                    x = torch.randn(shape, requires_grad=True)
                    bmm_calls.clear()
                    y = layer(x)
                    split = amd and x.numel() == 64 and 64 % threads == 0
                    assert len(bmm_calls) == split and y.shape == (*shape[:-1], 96)
                    torch.testing.assert_close(y, F.linear(x, weight, layer.bias), atol=1e-6, rtol=0)
                    (grad,) = torch.autograd.grad(y.sum(), x)
                    torch.testing.assert_close(grad, weight.sum(0).expand(shape), atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("amd", [False, True])
def test_generation_layout_on_each_cpu(tmp_path, monkeypatch, amd):
    """Both layouts load_weights chooses from, whichever CPU runs the test: each lays out every weight as
    laid_out says, keeps the head tied, and gives transformers' logits and greedy tokens."""
    monkeypatch.setattr(gpt2, "AMD_CPU", amd)
    hf = hf_twin(tiny_model(seed=15))
    hf.save_pretrained(tmp_path / "hf")
    loaded = GPT.from_pretrained(str(tmp_path / "hf"))
    assert all(laid_out(p, amd) for p in loaded.parameters())
    assert amd == (loaded.lm_head.weight.stride() == (1, TINY["vocab_size"]))  # the head: (vocab, C)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    greedy = hf.generate(idx[:, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None, attention_mask=torch.ones_like(idx[:, :5]))
    assert torch.equal(loaded.generate(idx[:, :5], 12, temperature=0), greedy)


@TENSORFLOW
def test_every_reader_gives_transformers_logits_and_one_layout(tmp_path):
    """The same weights as transformers' own folder, OpenAI's TensorFlow checkpoint and a .pt of ours:
    each loads to transformers' logits and greedy tokens, and to the same memory layout (float32,
    laid_out for this CPU, the head tied to wte), whatever the file."""
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
            assert laid_out(p, gpt2.AMD_CPU), (path, name, p.stride())
    assert layouts[0] == layouts[1] == layouts[2]


def test_gpt2_py_copied_alone_imports_generates_and_reloads(tmp_path):
    """gpt2.py in an empty folder: it imports with torch and tiktoken (nothing of the project, no
    TensorFlow, safetensors or transformers), generates, and reads its own checkpoint back without
    importing torch._dynamo (a second of start-up that GPT.empty's skipped draws avoid)."""
    shutil.copy(ROOT / "gpt2.py", tmp_path)
    code = ("import sys, torch, gpt2\n"
            "m = gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32))\n"
            "prompt = torch.tensor([gpt2.Tokenizer().encode('Every effort')])\n"
            "out = m.generate(prompt, 5, temperature=0)\n"
            "torch.save(m.checkpoint(), 'm.pt')\n"
            "again = gpt2.GPT.from_pretrained('m.pt').generate(prompt, 5, temperature=0)\n"
            "print(out.shape[1], torch.equal(again, out), gpt2.__file__)\n"
            "print(sorted(n for n in sys.modules if n == 'torch._dynamo' or n.split('.')[0] in\n"
            "      {'tensorflow', 'safetensors', 'transformers', 'trainer', 'loading', 'sample'}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
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
    with pytest.raises(FileNotFoundError,
                       match=r"models/355M not found: run  python download_weights.py --model 355M"):
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
    normal_ = torch.Tensor.normal_
    model = GPT.empty(GPTConfig.from_name("1558M"))  # 6 GB of weights if they were there
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_557_611_200
    assert torch.Tensor.normal_ is normal_  # the draws it skipped are back for every other model
    assert abs(GPT(GPTConfig(**TINY)).transformer.wte.weight.std() - 0.02) < 0.002  # GPT-2's initial scale


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
    assert not ours.training \
           and ours.config == GPTConfig(vocab_size=100, n_ctx=48, n_embd=64, n_head=4, n_layer=2)
    for name, p in ours.named_parameters():
        assert laid_out(p, gpt2.AMD_CPU), (name, p.stride())
    idx = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)

    hf.half().save_pretrained(tmp_path / "f16")
    half = GPT.from_pretrained(str(tmp_path / "f16"))
    hf.float()
    for name, p in half.state_dict().items():  # float16 -> float32 is exact
        assert torch.equal(p, ours.state_dict()[name].half().float()), name

    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = {k.removeprefix("transformer."): v
               for k, v in load_file(tmp_path / "f32" / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48) for i in range(2)}
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text(json.dumps({  # the Hub's openai-community/gpt2 config.json, tiny
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "embd_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 48, "n_embd": 64, "n_head": 4,
        "n_layer": 2, "n_positions": 48, "resid_pdrop": 0.1, "vocab_size": 100}))
    for name, p in GPT.from_pretrained(str(hub)).state_dict().items():
        assert torch.equal(p, ours.state_dict()[name]), name


# -----------------------------------------------------------------------------
# Bad input: each a clear message


def test_unknown_size_name():
    assert size_name("gpt2-medium") == "355M" and size_name("1558M") == "1558M"
    with pytest.raises(ValueError, match="unknown model size 'gpt5'.*124M.*gpt2-xl"):
        GPTConfig.from_name("gpt5")


def test_missing_folder_and_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="nowhere: neither a .pt of ours nor a folder with config.json"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.ckpt.data-00000-of-00001 not found.*incomplete"):
        GPT.from_pretrained(str(OPENAI_124M))  # the real folder, whose 497 MB data file is absent


@TENSORFLOW
def test_variable_of_wrong_shape_or_name(tmp_path):
    hf = hf_twin(tiny_model())

    def shrink(v):
        v["model/h1/mlp/c_fc/b"] = v["model/h1/mlp/c_fc/b"][:-1]

    folder = write_openai_checkpoint(tmp_path / "bad", hf, n_ctx=TINY["n_ctx"], tweak=shrink)
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc.bias in .* of shape \[127\], not weights "
                       r"of shape \[128\]"):
        GPT.from_pretrained(str(folder))

    def rename(v):
        v["model/h1/mlp/c_fc/bias"] = v.pop("model/h1/mlp/c_fc/b")

    folder = write_openai_checkpoint(tmp_path / "renamed", hf, n_ctx=TINY["n_ctx"], tweak=rename)
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\], unexpected "
                       r"\['model/h1/mlp/c_fc/bias'\]"):
        GPT.from_pretrained(str(folder))


def test_checkpoint_of_another_shape(tmp_path):
    ckpt = tiny_model().checkpoint()
    ckpt["config"]["n_embd"] = 64  # the weights no longer fit the config
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt holds torch.float32 numbers of shape \[96, 32\], not "
                       r"weights of shape \[96, 64\]"):
        GPT.from_pretrained(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        GPT.from_pretrained(str(tmp_path / "other.pt"))
    torch.save({**tiny_model().checkpoint(), "labels": ["ham", "spam"]}, tmp_path / "classifier.pt")
    with pytest.raises(ValueError, match=r"classifier.pt is a classifier \(ham/spam\), not a language model"):
        GPT.from_pretrained(str(tmp_path / "classifier.pt"))


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


def test_tokenizer_offline_says_where_its_files_can_come_from(tmp_path):
    """gpt2.py alone, offline, with nothing in tiktoken's cache: an OSError that names TIKTOKEN_CACHE_DIR."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    code = "import gpt2\ntry:\n    gpt2.Tokenizer()\nexcept OSError as e:\n    print('OSError:', e)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith("OSError:") and r.stdout.rstrip().endswith(
        "offline, set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cache"), r.stdout + r.stderr[-2000:]
