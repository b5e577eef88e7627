"""download_weights.py --source huggingface, against a Hub on 127.0.0.1 (HF_ENDPOINT) serving what
transformers' save_pretrained wrote for a tiny random GPT-2 with GPT-2's whole vocabulary: with our own
download (huggingface_hub hidden) and through huggingface_hub's cache, and where TensorFlow cannot be
imported."""

import shutil
import sys

import pytest
import torch

import download_weights
from gpt2 import GPT, Tokenizer
from tests.helpers import OPENAI_124M, SAMPLE_PROMPT, hf_twin, one_line_error, run_script, tiny_model
from tests.test_download import (HUB_COMMIT, PORTAL_PAGE, _DlHandler, dl_no_wait,  # noqa: F401 (a fixture)
                                 hf_logits_equal)

REPO = "/openai-community/gpt2/resolve/main/"  # where the Hub serves 124M's files


@pytest.fixture(scope="module")
def hub_release(tmp_path_factory):
    """The Hub's openai-community/gpt2 as the test serves it: a tiny GPT-2 saved by transformers' own
    save_pretrained, with GPT-2's tokenizer files (vocab.json and merges.txt hold what OpenAI's encoder.json
    and vocab.bpe hold) -> (the folder, {URL path: bytes})."""
    folder = tmp_path_factory.mktemp("hub") / "gpt2"
    hf_twin(tiny_model(seed=8, vocab_size=50257, n_embd=64)).save_pretrained(folder)
    shutil.copy(OPENAI_124M / "encoder.json", folder / "vocab.json")
    shutil.copy(OPENAI_124M / "vocab.bpe", folder / "merges.txt")
    return folder, {REPO + p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(serve, hub_release, monkeypatch):
    """The Hub, on 127.0.0.1, named by HF_ENDPOINT as a user would name a mirror."""
    server = serve(_DlHandler, files=dict(hub_release[1]), requests=[], cut_once=set(), ignore_range=False,
                   portal=None, commit=HUB_COMMIT)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server


@pytest.fixture
def without_hf_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub: ImportError


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def fetched(hub, folder):
    """The Hub's files arrived whole in folder, with encoder.json (vocab.json under OpenAI's name)."""
    for name in download_weights.HUB_FILES:
        assert (folder / name).read_bytes() == hub.files[REPO + name], name
    assert (folder / "encoder.json").read_bytes() == hub.files[REPO + "vocab.json"]
    assert not list(folder.glob("*.part")) and not list(folder.glob("*.tmp"))


def hub_run(run_main, models, *args):
    return run_main("download_weights.py", "--source", "huggingface", "--models-dir", models, *args)


def test_hub_download_without_tensorflow_then_sample(hub, hub_release, tmp_path):
    """Where TensorFlow and huggingface_hub cannot be imported: download_weights.py fetches the folder and
    sample.py --model 124M continues a prompt at once, with transformers' greedy tokens on the same folder."""
    from transformers import GPT2LMHeadModel

    guard = tmp_path / "not-installed"
    guard.mkdir()
    for name in ("tensorflow", "huggingface_hub"):
        (guard / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {"PYTHONPATH": str(guard), "HF_ENDPOINT": hub.url}
    r = run_script("download_weights.py", "--source", "huggingface", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    fetched(hub, tmp_path / "models" / "124M")
    assert not any(path.startswith("HEAD") for path, _ in hub.requests)  # our own download, not the Hub's
    r = run_script("sample.py", "--model", "124M", "--temperature", 0, "--max-new-tokens", 12, cwd=tmp_path,
                   env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    tok, hf = Tokenizer(), GPT2LMHeadModel.from_pretrained(hub_release[0]).eval()
    prompt = torch.tensor([tok.encode(SAMPLE_PROMPT)])
    greedy = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert r.stdout == SAMPLE_PROMPT + tok.decode(greedy[0, prompt.size(1):].tolist()) + "\n"


@pytest.mark.usefixtures("dl_no_wait", "without_hf_hub")
def test_hub_own_download_resumes_and_loads_as_transformers(hub, hub_release, tmp_path, run_main):
    """Our download: model.safetensors drops half way, the retry asks for the rest; the folder loads to
    transformers' logits on the Hub's folder; a second run checks each file and requests nothing."""
    from transformers import GPT2LMHeadModel

    hub.cut_once = {REPO + "model.safetensors"}
    r = hub_run(run_main, tmp_path, "--model", "gpt2")
    assert r.returncode == 0, r.stderr
    fetched(hub, tmp_path / "124M")
    asked = [rng for path, rng in hub.requests if path == REPO + "model.safetensors"]
    assert len(asked) == 2 and asked[0] is None and asked[1].startswith("bytes=")
    hf_logits_equal(GPT.from_pretrained(str(tmp_path / "124M")),
                    GPT2LMHeadModel.from_pretrained(hub_release[0]).eval(), 50257)
    n = len(hub.requests)
    r = hub_run(run_main, tmp_path)
    assert r.returncode == 0 and r.stdout.count("complete, skipped") == 5 and len(hub.requests) == n


@pytest.mark.usefixtures("without_hf_hub")
def test_hub_own_download_refuses_a_cut_file_and_an_html_page(hub, tmp_path, run_main):
    """A model.safetensors served whole but shorter than its index says (Content-Length agrees), and a captive
    portal's page for every request: one line each, nothing saved as the file."""
    whole = hub.files[REPO + "model.safetensors"]
    hub.files[REPO + "model.safetensors"] = whole[:len(whole) // 2]
    line = one_line_error(hub_run(run_main, tmp_path))
    assert f"{hub.url}{REPO}model.safetensors sent " in line
    assert "not the file model.safetensors: not saved" in line
    folder = tmp_path / "124M"
    assert not (folder / "model.safetensors").exists() and not list(folder.glob("*.part"))
    assert (folder / "merges.txt").exists()  # the files before it were fine
    hub.portal = PORTAL_PAGE
    line = one_line_error(hub_run(run_main, tmp_path / "other"))
    assert f"{hub.url}{REPO}vocab.json answered with an HTML page" in line and "--source openai" in line
    assert not (tmp_path / "other" / "124M").exists()


def test_hub_through_huggingface_hubs_cache(hub, hub_release, tmp_path, run_main, hf_cache):
    """With huggingface_hub: the files come through its cache (it asks HEAD first), loading to transformers'
    logits; another models folder then gets them from the cache, with no file fetched again."""
    from transformers import GPT2LMHeadModel

    r = hub_run(run_main, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    fetched(hub, tmp_path / "a" / "124M")
    assert ("HEAD", REPO + "config.json") in hub.requests and list(hf_cache.rglob("model.safetensors"))
    hf_logits_equal(GPT.from_pretrained(str(tmp_path / "a" / "124M")),
                    GPT2LMHeadModel.from_pretrained(hub_release[0]).eval(), 50257)
    n = len(hub.requests)
    r = hub_run(run_main, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    fetched(hub, tmp_path / "b" / "124M")
    assert all(path == "HEAD" for path, _ in hub.requests[n:])  # is it still the same file? no GET


def test_hub_through_huggingface_hub_resumes_and_refuses_bad_files(hub, tmp_path, run_main, hf_cache,
                                                                    monkeypatch):
    """huggingface_hub resumes a transfer that drops; a file that is not what it must be is refused in one
    line and removed from its cache too (the next run fetches it again); a captive portal is one line."""
    import huggingface_hub

    # it writes what it received 10 MB at a time: a file this small would start over, not resume
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.cut_once = {REPO + "model.safetensors"}
    assert hub_run(run_main, tmp_path / "a").returncode == 0
    fetched(hub, tmp_path / "a" / "124M")
    assert any(path == REPO + "model.safetensors" and rng for path, rng in hub.requests)  # a Range request

    whole = hub.files[REPO + "config.json"]
    hub.files[REPO + "config.json"], hub.commit = b'{"model_type": "gpt2"}', "f" * 40  # JSON, no GPT-2 config
    line = one_line_error(hub_run(run_main, tmp_path / "b"))
    assert f"{hub.url}{REPO}config.json sent " in line and "holds no GPT-2 config" in line
    assert not (tmp_path / "b" / "124M" / "config.json").exists()
    assert not [p for p in hf_cache.rglob("*") if p.is_file() and p.read_bytes() == b'{"model_type": "gpt2"}']
    hub.files[REPO + "config.json"], hub.commit = whole, "e" * 40
    assert hub_run(run_main, tmp_path / "b").returncode == 0
    fetched(hub, tmp_path / "b" / "124M")

    hub.portal = PORTAL_PAGE
    line = one_line_error(hub_run(run_main, tmp_path / "c"))
    assert f"could not download {hub.url}{REPO}vocab.json with huggingface_hub" in line
    assert not (tmp_path / "c" / "124M").exists()
