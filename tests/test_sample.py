"""sample.py, on a tiny checkpoint of this project's."""

import pytest
import torch

from files import save_atomic
from gpt2 import GPT, GPTConfig, Tokenizer
from instruction import format_prompt
from tests.helpers import DATA, SAMPLE_PROMPT

# -----------------------------------------------------------------------------
# sample.py, on a tiny train.py-style checkpoint

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
    # one batch, each row as the single run
    assert batch.stdout.split("\n" + "-" * 40 + "\n") == [r.stdout] * 3


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
    assert tok.decode(model.generate(torch.tensor([[0]]), 4, temperature=0)[0, 1:].tolist()) \
           == " Yes<|endoftext|>" * 2
    r = sample(path, "--instruction", "Is the sky blue?", "--temperature", 0, "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == " Yes\n"


def test_sample_tokenizer_of_an_openai_folder(sample_ckpt, tmp_path, monkeypatch):
    """A size name or folder reads the folder's encoder.json (offline); a .pt uses tiktoken's."""
    import tiktoken

    from loading import load_tokenizer as tokenizer_for

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "124M").symlink_to(DATA / "gpt2-124M")
    monkeypatch.chdir(tmp_path)
    text = "Every effort moves you, naïvely 🙂"
    for spec in ("gpt2", str(DATA / "gpt2-124M")):
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


def test_sample_missing_model_names_the_download_command(tmp_path, run_main):
    r = run_main("sample.py", "--model", "gpt2", cwd=tmp_path)  # no models/ here
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python download_weights.py --model 124M" in r.stderr


