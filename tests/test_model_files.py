"""Model files off the happy path: a vocabulary that is not GPT-2's, a classifier where a language model is
wanted, folders in formats gpt2.py does not read, safetensors files whose index lies. Each is one line (exit
1, no traceback) and leaves every file as it was; a padded vocabulary (nanoGPT's 50,304) works, and no id
past GPT-2's 50,257 tokens is ever sampled or shown."""

import json
import struct

import torch

import explore
import finetune_spam as fs
from download_weights import write_hf
from gpt2 import GPT, GPTConfig
from tests.helpers import EOT, SAMPLE_PROMPT, one_line_error, snapshot, tiny_model

TOKENS = GPTConfig.vocab_size  # GPT-2's 50,257


def padded_model():
    """A tiny model with nanoGPT's padded vocabulary whose extra rows win every prediction: ln_f makes each
    hidden state all ones, and the rows past GPT-2's tokens are all tens (logit 320, the real ones about
    2)."""
    model = tiny_model(seed=3, vocab_size=50304)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[TOKENS:] = 10.0
    return model


def test_a_padded_vocabulary_never_yields_an_id_past_gpt2s(tmp_path, run_main):
    model = padded_model()
    ids = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        assert model(ids)[0][0, -1].argmax() >= TOKENS  # unsliced, a padded id would win
    for temperature, top_k in ((0.0, None), (1.0, None), (1.0, 50)):
        out = model.generate(ids, 20, temperature, top_k)
        assert out.shape == (1, 23) and out.max() < TOKENS
    probs = explore.next_token_probabilities(model, ids[0].tolist())
    assert probs.shape == (3, TOKENS) and torch.allclose(probs.sum(-1), torch.ones(3))
    king = 5822  # ' king'
    with torch.no_grad():
        model.transformer.wte.weight[TOKENS:] = model.transformer.wte.weight[king]  # cosine 1 with ' king'
    wte = model.transformer.wte.weight
    # unsliced: the padded rows
    assert all(i >= TOKENS for i, _ in explore.nearest(wte, wte[king], 5, [king]))
    assert all(i < TOKENS for i, _ in explore.nearest(explore.token_embeddings(model), wte[king], 5, [king]))
    # the scripts, through a Hugging Face folder of it
    write_hf(padded_model(), tmp_path / "padded")
    config = json.loads((tmp_path / "padded" / "config.json").read_text())
    assert config["vocab_size"] == 50304 and config["bos_token_id"] == config["eos_token_id"] == EOT
    for n in (1, 3):
        r = run_main("sample.py", "--model", tmp_path / "padded", "--num-samples", n, "--max-new-tokens", 8)
        assert r.returncode == 0 and r.stdout.startswith(SAMPLE_PROMPT), r.stderr[-2000:]
    r = run_main("explore.py", "--model", tmp_path / "padded", "--neighbors", "king", "--top-k", 3)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4, r.stderr[-2000:]


def test_a_vocabulary_smaller_than_gpt2s_is_refused_by_every_script_that_reads_text(tmp_path, run_main):
    write_hf(tiny_model(vocab_size=1000), tmp_path / "small")
    before = snapshot(tmp_path)
    for args in (("sample.py", "--model"), ("explore.py", "--neighbors", "king", "--model"),
                 ("finetune_instruct.py", "--out-dir", tmp_path / "i", "--init-from")):
        line = one_line_error(run_main(*args, tmp_path / "small"))
        assert "small has a vocabulary of 1,000 tokens, fewer than GPT-2's 50,257" in line
    assert snapshot(tmp_path) == before


def test_a_classifier_is_named_as_one_with_what_it_is_for(tmp_path, run_main):
    classifier = fs.with_class_head(tiny_model(vocab_size=TOKENS))
    torch.save(classifier.checkpoint(labels=fs.LABELS, pool="last", seed=1), tmp_path / "classifier.pt")
    before = snapshot(tmp_path)
    for args in (("sample.py", "--model", tmp_path / "classifier.pt"),
                 ("explore.py", "--neighbors", "king", "--model", tmp_path / "classifier.pt"),
                 ("download_weights.py", "--export-hf", tmp_path / "classifier.pt", tmp_path / "hf")):
        line = one_line_error(run_main(*args))
        assert "classifier.pt is a classifier (ham/spam), not a language model: it tells spam from ham, " \
               f"with python finetune_spam.py --classify TEXT --out-dir {tmp_path}" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "hf").exists()


def test_folders_in_formats_not_read_say_what_is(tmp_path, run_main):
    write_hf(tiny_model(vocab_size=TOKENS), tmp_path / "hf")
    for name in ("pytorch_model.bin", "model.safetensors.index.json"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
        (folder / name).write_bytes(b"{}")
        line = one_line_error(run_main("sample.py", "--model", folder))
        assert f"{folder / name}: " in line and "is not read here, only model.safetensors whole" in line
        assert ".save_pretrained(new_folder, max_shard_size='100GB')" in line and "hparams.json" not in line


def rewrite_header(path, change):
    """Edit a safetensors file's index (8 bytes of length, then JSON) in place, keeping its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_safetensors_files_whose_index_lies_are_refused(tmp_path, run_main):
    bias, weight = "transformer.h.0.ln_1.bias", "transformer.h.0.ln_1.weight"

    def shared(h):  # ln_1.bias reads ln_1.weight's bytes
        h[bias]["data_offsets"] = h[weight]["data_offsets"]

    def negative(h):
        h[bias]["data_offsets"] = [-128, 0]

    def short(h):  # a span of 8 bytes for 32 floats
        start = h[bias]["data_offsets"][0]
        h[bias]["data_offsets"] = [start, start + 8]

    for lie in (shared, negative, short):
        folder = tmp_path / lie.__name__
        write_hf(tiny_model(vocab_size=TOKENS), folder)
        rewrite_header(folder / "model.safetensors", lie)
        before = snapshot(folder)
        line = one_line_error(run_main("sample.py", "--model", folder))
        assert f"{folder / 'model.safetensors'} is not a whole safetensors file" in line, line
        assert snapshot(folder) == before


def test_safetensors_of_other_dtypes_name_the_tensor_or_load(tmp_path, run_main):
    from safetensors.torch import load_file, save_file

    model = tiny_model(seed=4, vocab_size=TOKENS)
    write_hf(model, tmp_path / "f64")
    path = tmp_path / "f64" / "model.safetensors"
    save_file({k: t.double() for k, t in load_file(path).items()}, path)  # float64: read, as float32
    loaded = GPT.from_pretrained(str(tmp_path / "f64"))
    for (name, theirs), ours in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert theirs.dtype == torch.float32 and torch.equal(theirs, ours), name
    tensors = load_file(path)
    tensors["transformer.h.0.ln_1.bias"] = tensors["transformer.h.0.ln_1.bias"].long()
    save_file(tensors, path)
    line = one_line_error(run_main("sample.py", "--model", tmp_path / "f64"))
    assert "transformer.h.0.ln_1.bias in" in line and "holds torch.int64 numbers of shape [32]" in line
