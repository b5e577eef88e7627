"""int8.py: every matrix in int8, one scale per output row, and sample.py --int8."""

import torch
from torch import nn

from files import save_atomic
from gpt2 import GPT, GPTConfig, Linear, Tokenizer
from int8 import quantize
from tests.helpers import SAMPLE_PROMPT, tiny_model

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_every_matrix_the_head_included_is_int8_with_one_scale_per_row():
    model = tiny_model()
    q = quantize(model)
    names = ["lm_head"] + [f"transformer.h.{i}.{n}" for i in range(2) for n in LINEARS]
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} == set(names)
    for name in names:
        w, qw = model.get_submodule(name).weight.detach(), q.get_submodule(name).weight()
        assert qw.dtype == torch.qint8 and qw.qscheme() == torch.per_channel_affine, name
        # symmetric per row: zero at 0, the row's largest |w| at the end of [-128, 127]
        scales = w.abs().amax(dim=1) / 127.5
        assert torch.allclose(qw.q_per_channel_scales().float(), scales, rtol=1e-5) \
               and not qw.q_per_channel_zero_points().any()
        assert ((qw.dequantize() - w).abs() <= scales[:, None] / 2 * 1.001).all(), name
    # the embedding is looked up, not multiplied: it stays the float32 one; model itself is left as it was
    assert torch.equal(q.transformer.wte.weight, model.transformer.wte.weight)
    assert all(type(model.get_submodule(n)) is Linear for n in names)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_int8_logits_are_the_float32_ones_to_within_their_rounding():
    model = tiny_model(seed=1)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        (a, _), (b, _) = model(idx), quantize(model)(idx)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # int8's rounding, 8 bits a value
    assert not torch.equal(a, b)


def test_sample_int8_prints_what_the_int8_model_generates(run_main, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_ctx=64, n_embd=64, n_head=4, n_layer=2)).eval()
    path = str(tmp_path / "tiny.pt")
    save_atomic(model.checkpoint(step=0), path)
    r = run_main("sample.py", "--model", path, "--int8", "--temperature", 0, "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = tok.encode(SAMPLE_PROMPT)
    out = quantize(model).generate(torch.tensor([ids]), 20, temperature=0)
    assert r.stdout == SAMPLE_PROMPT + tok.decode(out[0, len(ids):].tolist()) + "\n"
    r = run_main("sample.py", "--model", path, "--int8", "--device", "meta")
    assert r.returncode == 1 and r.stderr == "error: --int8 runs on the CPU, not meta: add --device cpu\n"
