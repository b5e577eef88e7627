"""explore.py: weights, attention, embeddings and predictions, each against a reference."""

import math
import re
import sys

import pytest
import torch
from torch.nn import functional as F

import explore
from errors import UserError
from files import save_atomic
from gpt2 import GPT, Tokenizer
from tests.helpers import (OPENAI_124M, TENSORFLOW, TINY, hf_twin, real_index, run_in_process, tiny_model,
                           write_openai_checkpoint)


def explore_png_ok(path):
    """A real PNG that matplotlib reads back, with more than a few colours in it."""
    import matplotlib.pyplot as plt
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = plt.imread(str(path))
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 \
           and len(colours) > 20, (path, pixels.shape, len(colours))


def explore_parameters(n_layer, n_head, n_embd, vocab_size=50257, n_ctx=1024):
    """GPT-2's parameter count by hand: embeddings, per block two layer norms, q/k/v, the
    attention projection and the two feed-forward layers, then ln_f; the head is wte."""
    C = n_embd
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return vocab_size * C + n_ctx * C + n_layer * block + 2 * C


@TENSORFLOW
def test_explore_weights_of_the_real_124M_index(monkeypatch, capsys):
    """From the index alone (no data file): every tensor with OpenAI's name and shape, the real total.
    (main() in this process: TensorFlow is loaded once.)"""
    monkeypatch.setattr(sys, "argv", ["explore.py", "--model", str(OPENAI_124M), "--weights"])
    explore.main()
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("transformer.")]
    assert {openai: tuple(map(int, shape.split("x"))) for _, openai, _, shape, _ in rows} == real_index()
    for ours, theirs in ((tuple(map(int, a.split("x"))), tuple(map(int, b.split("x"))))
                         for _, _, a, b, _ in rows):
        assert theirs == ((1, ours[1], ours[0]) if len(theirs) == 3 else ours)  # linear layers: (1, in, out)
    counts = [int(n.replace(",", "")) for *_, n in rows]
    assert sum(counts) == 124_439_808 == explore_parameters(12, 12, 768)  # GPT-2 124M, the tied head once
    assert "total: 124,439,808 parameters" in stdout
    blocks = {name: int(n.replace(",", ""))
              for name, n in (line.split() for line in lines if line.startswith("  h."))}
    assert len(blocks) == 12 and set(blocks.values()) == {explore_parameters(1, 12, 768, 0, 0) - 2 * 768}
    sizes = {line.split()[0]: [int(x.replace(",", "")) for x in line.split()[1:]]
             for line in lines if re.match(r"^  \d+M ", line)}
    assert sizes == {name: [L, H, C, explore_parameters(L, H, C)] for name, (L, H, C) in
                     {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280),
                      "1558M": (48, 25, 1600)}.items()}


@TENSORFLOW
def test_explore_weights_of_our_checkpoint(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.pt"
    save_atomic(model.checkpoint(), str(path))
    tensors = explore.model_tensors(str(path))
    assert [name for name, _, _ in tensors] == [k for k in model.state_dict() if k != "lm_head.weight"]
    assert sum(math.prod(shape) for _, shape, _ in tensors) == explore_parameters(2, 4, 32, 96, 64)
    # OpenAI's shape of each, as write_openai_checkpoint lays the same weights out in TensorFlow
    openai = write_openai_checkpoint(tmp_path / "openai", hf_twin(model), n_ctx=64)
    assert {GPT.openai_name(name): theirs for name, _, theirs in tensors} == \
           {GPT.openai_name(name): theirs for name, _, theirs in explore.model_tensors(str(openai))}


def test_explore_help_names_its_flags_and_no_folder_of_ours(run_main):
    r = run_main("explore.py", "--help")
    assert "go into --out-dir" in r.stdout and "go into --out." not in r.stdout and "shared" not in r.stdout


def test_explore_attention_weights_are_causal_sum_to_1_and_equal_q_dot_k():
    """gpt2.py's kept weights against softmax(q kᵀ / sqrt(hs)) from each layer's own q and k,
    taken from c_attn(ln_1(x)) on the block's input."""
    model = tiny_model(seed=5)
    ids = torch.randint(0, TINY["vocab_size"], (20,)).tolist()
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
             for block in model.transformer.h]
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
    """--words' plane: the two eigenvectors of the covariance with the largest eigenvalues (numpy), up to
    sign."""
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
    torch.testing.assert_close(explore.next_token_probabilities(model, ids.tolist()), expected, atol=1e-6,
                               rtol=1e-4)


EXPLORE_TEXT = "Every effort moves you to the end"


@pytest.fixture(scope="module")
def explore_run(tmp_path_factory):
    """Every picture-and-text view at once, on a tiny model with GPT-2's vocabulary."""
    folder = tmp_path_factory.mktemp("explore")
    model = tiny_model(seed=8, vocab_size=50257)
    save_atomic(model.checkpoint(), str(folder / "tiny.pt"))
    r = run_in_process("explore.py", "--model", folder / "tiny.pt", "--out-dir", folder / "pictures",
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
        assert [line.rsplit(None, 1)[0].strip() for line in lines] \
               == [repr(tok.decode([i])) for i, _ in expected]
        assert [float(line.split()[-1]) for line in lines] \
               == pytest.approx([s for _, s in expected], abs=1e-3)

    ids = tok.encode(EXPLORE_TEXT)
    with torch.no_grad():
        reference = hf_twin(model)(torch.tensor([ids]), labels=torch.tensor([ids]))
    probs = F.softmax(reference.logits[0], dim=-1)
    table = stdout.split("top 3 predictions\n")[1].splitlines()[:len(ids)]
    for t, line in enumerate(table):
        top = probs[t].topk(3)
        printed = [float(p) for p in re.findall(r"['\"] ([\d.e+-]+)(?:,|$)", line)]
        assert printed == pytest.approx(top.values.tolist(), rel=1e-3), line
        assert line.index(repr(tok.decode([top.indices[0].item()]))) \
               < line.index(repr(tok.decode([top.indices[2].item()])))
        if t + 1 < len(ids):
            surprisal = float(re.search(r" [\d.e+-]+ +([\d.]+)   ", line).group(1))
            assert surprisal == pytest.approx(-probs[t, ids[t + 1]].log().item(), abs=0.01)
    assert f"loss {reference.loss.item():.3f} nats per token, perplexity {reference.loss.exp().item():.1f}" \
           in stdout


@pytest.mark.parametrize("args, message", [
    (["--neighbors", "Xqzvbtkw"], "error: ' Xqzvbtkw' is 6 tokens"),
    (["--next", "word " * 70],
     "error: --next: the text is 71 tokens, longer than the model's context window (64)"),
    (["--neighbors", ""], "error: '' is not a word: give one such as king"),
    (["--neighbors", " "], "error: ' ' is not a word: give one such as king"),
    (["--words", "king", "", "queen"], "error: '' is not a word: give one such as king"),
    (["--next", EXPLORE_TEXT, "--top-k", 60000],
     "error: --top-k 60,000 is more than the 50,257 tokens of GPT-2's"),
    (["--neighbors", "king", "--top-k", 50258],
     "error: --top-k 50,258 is more than the 50,257 tokens of GPT-2's"),
])
def test_explore_bad_input_is_one_clear_line(explore_run, args, message, run_main):
    model, pictures, _ = explore_run
    r = run_main("explore.py", "--model", pictures.parent / "tiny.pt", "--out-dir", pictures.parent / "bad",
                 *args)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.strip() == r.stderr.strip().splitlines()[-1]
    assert r.stderr.startswith(message), r.stderr
    assert not (pictures.parent / "bad").exists()


def test_explore_top_k_as_large_as_the_vocabulary_gives_every_other_token():
    wte = tiny_model(seed=9, vocab_size=50257).transformer.wte.weight.detach()
    found = explore.nearest(wte, wte[7], 50257, exclude=[7])
    assert len(found) == 50256 and sorted(i for i, _ in found) == [i for i in range(50257) if i != 7]
    expected = explore_brute_force(wte, wte[7], 50, [7])
    assert [i for i, _ in found[:50]] == [i for i, _ in expected]
    assert [s for _, s in found[:50]] == pytest.approx([s for _, s in expected], abs=1e-6)
