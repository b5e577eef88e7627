"""Rotary positions (GPTConfig(positions="rope")) against code nobody here wrote: transformers' Llama rotary
embedding for the rotation, and transformers' GPT-NeoX (GPT-2's blocks with RoPE, when its residual is
sequential and its rotation covers the whole head) for the whole model; then what RoPE promises (only the
distance between tokens counts), the KV cache, batches of different lengths, checkpoints, and
tools/compare_positions.py on a slice of the real Tiny Shakespeare."""

import json

import pytest
import torch

import gpt2
from gpt2 import GPT, GPTConfig
from tests.helpers import DATA, TINY, cached_logits, generate_without_cache, ragged_prompts, tiny_model


def rope_model(seed=0, **overrides):
    """A tiny rope GPT whose attention scores are large (q, k, v weights of std 1), so that the positions,
    which reach the model only through the scores, move its greedy choices."""
    model = tiny_model(seed, positions="rope", **overrides)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0.0, 1.0)
    return model


def neox_twin(model):
    """transformers' GPTNeoXForCausalLM holding exactly `model`'s weights: GPT-2's blocks (layer norms,
    GELU in its tanh form, a 4x MLP, biases, the head tied to the token embedding) with RoPE over the whole
    head and the residual added after attention and again after the MLP, as GPT-2 does."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c, hs = model.config, model.config.n_embd // model.config.n_head
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, intermediate_size=4 * c.n_embd, hidden_act="gelu_new",
        max_position_embeddings=c.n_ctx, layer_norm_eps=1e-5, tie_word_embeddings=True,
        use_parallel_residual=False, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}))
    names = {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value",
             "attn.c_proj": "attention.dense", "ln_2": "post_attention_layernorm",
             "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
    state = {"gpt_neox.embed_in.weight": model.transformer.wte.weight,
             "gpt_neox.final_layer_norm.weight": model.transformer.ln_f.weight,
             "gpt_neox.final_layer_norm.bias": model.transformer.ln_f.bias}
    for i, block in enumerate(model.transformer.h):
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                t = block.get_submodule(ours).get_parameter(leaf)
                if ours == "attn.c_attn":  # ours: all q, then all k, then all v; theirs: q, k, v per head
                    t = t.view(3, c.n_head, hs, -1).transpose(0, 1).reshape(t.shape)
                state[f"gpt_neox.layers.{i}.{theirs}.{leaf}"] = t
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is embed_in, tied
    return hf.eval()


# -----------------------------------------------------------------------------
# The rotation and the model against transformers


def test_rotation_equals_llamas_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, nh, T, hs = 3, 4, 50, 16
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, nh, T, hs, generator=g), torch.randn(B, nh, T, hs, generator=g)
    counted = torch.arange(T)  # (T,): as one sequence counts, here from 0
    after_cache = torch.arange(900, 900 + T)  # far on, as after a long cache
    ragged = (torch.arange(T) - torch.tensor([0, 7, 31])[:, None]).clamp(min=0)  # (B, T): left-padded rows
    for pos in (counted, after_cache, ragged):
        cos, sin = llama(q, pos.expand(B, T))
        theirs_q, theirs_k = apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(gpt2.rope(q, pos), theirs_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(gpt2.rope(k, pos), theirs_k, atol=1e-6, rtol=0)


def test_rope_model_equals_transformers_gpt_neox():
    """The same weights in transformers' GPT-NeoX: the same logits and loss, the same greedy tokens, and for
    prompts of different lengths the same tokens as transformers' own left padding (its attention mask,
    and the positions it counts from it)."""
    model = rope_model(seed=2)
    neox = neox_twin(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 48))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
        reference = neox(idx, labels=idx)
    torch.testing.assert_close(logits, reference.logits[:, :-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, reference.loss, atol=1e-5, rtol=0)
    prompts = idx[:, :6]
    theirs = neox.generate(prompts, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                           eos_token_id=None, attention_mask=torch.ones_like(prompts))
    ours = model.generate(prompts, 30, temperature=0)
    assert torch.equal(ours, theirs) and all(len(set(row[6:].tolist())) > 1 for row in ours)
    prompts = ragged_prompts([3, 11, 7, 1], seed=4)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    theirs = neox.generate(ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert model.generate(prompts, 15, temperature=0) == [p + row[T:] for p, row in
                                                          zip(prompts, theirs.tolist())]


# -----------------------------------------------------------------------------
# What RoPE promises, and the paths that feed it positions


def test_shifting_every_position_alike_changes_nothing(monkeypatch):
    """Only the distance between a query and a key counts: the logits of the model whose rotation sees
    positions + 7 for every token are the model's own."""
    model, idx = rope_model(seed=1), torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        logits = model(idx)[0]
        rope = gpt2.rope
        monkeypatch.setattr(gpt2, "rope", lambda x, pos: rope(x, pos + 7))
        shifted = model(idx)[0]
    torch.testing.assert_close(shifted, logits, atol=1e-4, rtol=0)


def test_kv_cache_gives_the_logits_and_tokens_of_recomputing():
    """Cached keys are kept turned and new tokens go on from the cache's length: logits of a prompt, single
    tokens and a chunk equal one full forward, and 20 greedy tokens (the window sliding past n_ctx = 16, so
    the positions start again from the last 16 tokens) equal rerunning the whole sequence every step."""
    model = rope_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)[0]
    stepped = cached_logits(model, idx)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)
    model = rope_model(n_ctx=16)
    prompts = idx[:, :5]
    out = model.generate(prompts, 20, temperature=0)
    assert all(len(set(row[5:].tolist())) > 3 for row in out)  # greedy, yet not one token over and over
    with torch.no_grad():
        assert torch.equal(out, generate_without_cache(model, prompts, 20, temperature=0))


def test_rope_ragged_batch_gives_each_prompt_what_it_gives_alone():
    """Each left-padded row counts its positions from its first real token (rows 3 and 6 slide past the
    32-token window)."""
    model = rope_model(seed=2, n_ctx=32)
    prompts = ragged_prompts([1, 5, 17, 30, 9, 2, 24, 12])
    out = model.generate(prompts, 12, temperature=0)
    alone = [model.generate(torch.tensor([p]), 12, temperature=0)[0].tolist() for p in prompts]
    assert out == alone
    assert sum(len(set(row[len(p):])) > 2 for p, row in zip(prompts, out)) >= 6


# -----------------------------------------------------------------------------
# The option, its state dict and checkpoints


def test_positions_is_learned_or_rope():
    assert GPTConfig().positions == "learned" and "transformer.wpe.weight" in tiny_model().state_dict()
    for wrong in ("rotary", "alibi", "", None):
        with pytest.raises(ValueError, match="positions must be 'learned' or 'rope'"):
            GPTConfig(positions=wrong)


def test_rope_checkpoint_has_no_wpe_and_round_trips(tmp_path):
    model = rope_model(seed=4)
    assert not any("wpe" in name for name in model.state_dict())
    assert "wpe" not in model.transformer
    torch.save(model.checkpoint(step=3), tmp_path / "rope.pt")
    loaded = GPT.from_pretrained(str(tmp_path / "rope.pt"))
    assert loaded.config == model.config and loaded.config.positions == "rope"
    idx = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    greedy = [m.generate(idx[:, :4], 10, temperature=0) for m in (loaded, model)]
    assert torch.equal(*greedy)


def test_checkpoint_written_before_the_option_loads_as_learned(tmp_path):
    """A .pt whose config has no "positions" (as the scripts wrote them before) is GPT-2's learned kind."""
    model = tiny_model(seed=5)
    ckpt = model.checkpoint()
    del ckpt["config"]["positions"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = GPT.from_pretrained(str(tmp_path / "old.pt"))
    idx = torch.randint(0, TINY["vocab_size"], (1, 20))
    assert loaded.config.positions == "learned" and torch.equal(loaded(idx)[0], model(idx)[0])


# -----------------------------------------------------------------------------
# tools/compare_positions.py


def test_compare_positions_writes_the_figure_tables_and_json(tmp_path, run_main):
    """Both kinds, tiny, on the first 40,000 characters of the real Tiny Shakespeare."""
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    r = run_main("tools/compare_positions.py", "--data", tmp_path / "shakespeare.txt", "--out-dir", out,
                 "--seeds", "0", "1", "--steps", "6", "--batch-size", "2", "--context", "16", "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "32", "--eval-interval", "2", "--val-windows", "4",
                 "--long-windows", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for kind in ("learned", "rope"):
        runs = results["runs"][kind]
        assert [run["seed"] for run in runs] == [0, 1]
        assert [step for step, _ in runs[0]["curve"]] == [0, 2, 4, 6]
        assert [len(runs[0]["buckets"][n]) for n in ("2C", "4C")] == [4, 8]  # buckets of C/2 = 8 positions
        summary = results["summary"][kind]
        assert list(summary["points"]) == ["2", "4", "6"] and summary["tokens_per_s"][0] > 0
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| | learned | rope |" in table and "| step 6 (end) |" in table
    assert "| 56–63 (past C) |" in table and "training tokens/s" in table
    assert table in r.stdout


def test_compare_positions_buckets_average_the_same_tokens(monkeypatch):
    """The loss by position compares positions, not texts: with each token's loss set to its index in the
    held-out text, every bucket of every window length has the same mean."""
    from tools import compare_positions

    held = torch.arange(5000)
    monkeypatch.setattr(compare_positions, "token_losses", lambda model, wins: wins[:, 1:].float())
    for length in (32, 64):
        wins = compare_positions.windows(held, length, 5 + length // 8 - 1, stride=8)
        means = compare_positions.loss_by_position(None, wins, 8)
        assert len(means) == length // 8 and len(set(means)) == 1
