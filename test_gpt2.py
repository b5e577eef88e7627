"""Tests against references nobody here wrote: tiktoken, Hugging Face transformers'
GPT-2, and OpenAI's own checkpoint index. Real data comes from ../shared/data."""

import json
from pathlib import Path

import pytest
import torch

from gpt2 import GPT, GPTConfig, KVCache, Tokenizer, openai_name, sample_next, size_name

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
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
    ours, reference = Tokenizer(OPENAI_124M), Tokenizer()
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
        caches = [KVCache(2, model.config, "cpu", torch.float32) for _ in range(TINY["n_layer"])]
        pieces = [(0, 5), *((t, t + 1) for t in range(5, 12)), (12, 20)]  # a prompt, single tokens, a chunk
        stepped = torch.cat([model.lm_head(model.hidden_states(idx[:, a:b], caches)) for a, b in pieces], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


def generate_without_cache(model, idx, n):
    """The textbook loop: rerun the whole (cropped) sequence for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.n_ctx:])
        idx = torch.cat([idx, sample_next(logits[:, -1], temperature=1.0)], dim=1)
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
    model = tiny_model(n_ctx=16)
    long = torch.randint(0, TINY["vocab_size"], (1, 40))
    out = model.generate(long, 5, temperature=0)
    assert out.shape == (1, 45) and torch.equal(out[:, :40], long)
    assert torch.equal(out[:, 40:], model.generate(long[:, -16:], 5, temperature=0)[:, 16:])
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


# -----------------------------------------------------------------------------
# Sampling


def test_top_k_1_and_temperature_0_are_greedy():
    model = tiny_model()
    prompts = torch.randint(0, TINY["vocab_size"], (2, 6))
    greedy = model.generate(prompts, 15, temperature=0)
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompts, 15, temperature=0.8, top_k=1), greedy)


def test_samples_stay_in_top_k_and_top_p_sets():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    probs = torch.softmax(logits, -1)
    top5 = logits.topk(5).indices
    sorted_probs, order = probs.sort(descending=True)
    n_top_p = ((sorted_probs.cumsum(-1) - sorted_probs) <= 0.6).sum(-1)  # smallest set reaching 0.6
    for _ in range(200):
        k = sample_next(logits, top_k=5)
        assert (k == top5).any(-1).all()
        p = sample_next(logits, top_p=0.6)
        for row in range(4):
            assert p[row].item() in order[row, : n_top_p[row]].tolist()


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
    for name, p in GPT(GPTConfig.from_name("124M")).state_dict().items():
        if name != "lm_head.weight":  # tied to wte: OpenAI stores it once
            shape = tuple(p.shape)
            expected[openai_name(name)] = (1, shape[1], shape[0]) if p.dim() == 2 and "h." in name else shape
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


# -----------------------------------------------------------------------------
# Bad input: each a clear message


def test_unknown_size_name():
    assert size_name("gpt2-medium") == "355M" and size_name("1558M") == "1558M"
    with pytest.raises(ValueError, match="unknown model size 'gpt5'.*124M.*gpt2-xl"):
        GPTConfig.from_name("gpt5")


def test_missing_folder_and_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.ckpt.data-00000-of-00001 not found.*incomplete"):
        GPT.from_pretrained(str(OPENAI_124M))  # the real folder, whose 497 MB data file is absent


def test_variable_of_wrong_shape_or_name(tmp_path):
    hf = hf_twin(tiny_model())

    def shrink(v):
        v["model/h1/mlp/c_fc/b"] = v["model/h1/mlp/c_fc/b"][:-1]

    folder = write_openai_checkpoint(tmp_path / "bad", hf, n_ctx=TINY["n_ctx"], tweak=shrink)
    with pytest.raises(ValueError, match=r"model/h1/mlp/c_fc/b .* shape \[127\], expected \[128\]"):
        GPT.from_pretrained(str(folder))

    def rename(v):
        v["model/h1/mlp/c_fc/bias"] = v.pop("model/h1/mlp/c_fc/b")

    folder = write_openai_checkpoint(tmp_path / "renamed", hf, n_ctx=TINY["n_ctx"], tweak=rename)
    with pytest.raises(ValueError, match=r"missing \['model/h1/mlp/c_fc/b'\], unexpected \['model/h1/mlp/c_fc/bias'\]"):
        GPT.from_pretrained(str(folder))


def test_checkpoint_of_another_shape(tmp_path):
    ckpt = tiny_model().checkpoint()
    ckpt["config"]["n_embd"] = 64  # the weights no longer fit the config
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit its own config"):
        GPT.from_pretrained(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by this project"):
        GPT.from_pretrained(str(tmp_path / "other.pt"))
