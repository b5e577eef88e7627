"""download_weights.py --export-gguf: a GGUF file read back with the gguf package's own reader (every tensor,
every key llama.cpp reads, the tokenizer against OpenAI's encoder.json and vocab.bpe), and run by llama.cpp
itself (llama-cpp-python) where it is installed: its tokens and logits against ours."""

import json
import shutil

import numpy as np
import pytest
import torch

import finetune_spam
import gguf
import gguf_export
import gpt2
from errors import UserError
from files import save_atomic
from gpt2 import GPT, GPTConfig, Tokenizer
from tests.helpers import (EOT, OPENAI_124M, SAMPLE_PROMPT, TENSORFLOW, hf_twin, one_line_error, snapshot,
                           tiny_model, write_openai_checkpoint)

FULL = dict(vocab_size=50257, n_embd=64)  # llama.cpp needs GPT-2's whole tokenizer: a tiny model with it
Q = gguf.GGMLQuantizationType
# the names llama.cpp's gpt2 architecture loads (src/models/gpt2.cpp), for 2 blocks; no output.weight: the
# head is token_embd, tied
LLAMA_CPP_NAMES = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias",
                   *(f"blk.{i}.{t}.{p}" for i in range(2) for t in ("attn_norm", "attn_qkv", "attn_output",
                                                                     "ffn_norm", "ffn_up", "ffn_down")
                     for p in ("weight", "bias"))}


@pytest.fixture(scope="module")
def full_pt(tmp_path_factory):
    """A tiny model with GPT-2's whole vocabulary, as train.py saves one -> (model, its .pt)."""
    model = tiny_model(seed=5, **FULL)
    path = tmp_path_factory.mktemp("gguf") / "tiny.pt"
    save_atomic(model.checkpoint(), str(path))
    return model, path


def export(run_main, model, out, *flags, read=True):
    """download_weights.py --export-gguf -> the file, read by gguf's reader (its path, read=False)."""
    r = run_main("download_weights.py", "--export-gguf", model, out, *flags)
    assert r.returncode == 0, r.stderr
    return gguf.GGUFReader(out) if read else out


def field(reader, key):
    """A key's value as Python: a number, a string, or a list of them."""
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(v).decode("utf-8") for v in values]
    else:
        values = [v.item() for v in values]
    return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def ours_as_llama_cpp(model):
    """Our weights under llama.cpp's names, each (out, in) as nn.Linear holds it (gguf's reader gives numpy's
    row-major shape, the reverse of GGUF's ne)."""
    names = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
             "transformer.ln_f": "output_norm", "ln_1": "attn_norm", "attn.c_attn": "attn_qkv",
             "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        module, _, leaf = name.rpartition(".")
        if module.startswith("transformer.h."):
            block, _, rest = module.removeprefix("transformer.h.").partition(".")
            out[f"blk.{block}.{names[rest]}.{leaf}"] = p.float()
        else:
            out[f"{names[module]}.{leaf}"] = p.float()
    return out


def test_gguf_f32_holds_our_tensors_and_what_llama_cpp_reads(full_pt, tmp_path, run_main):
    """Every tensor equal to ours under llama.cpp's names; gpt2's keys (sizes, layer-norm epsilon); GPT-2's
    tokenizer: each token spelled as in OpenAI's encoder.json, the merges in vocab.bpe's order, one control
    token <|endoftext|> for bos, eos and unk."""
    model, pt = full_pt
    reader = export(run_main, pt, tmp_path / "m.gguf", "--gguf-type", "f32")
    tensors = {t.name: t for t in reader.tensors}
    ours = ours_as_llama_cpp(model)
    assert set(tensors) == set(ours) == LLAMA_CPP_NAMES
    for name, t in tensors.items():
        assert t.tensor_type == Q.F32, name
        assert list(reversed(t.shape.tolist())) == list(ours[name].shape), name  # GGUF's ne: innermost first
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(ours[name].shape), ours[name]), name
    c = model.config
    assert field(reader, "general.architecture") == "gpt2" and field(reader, "general.file_type") == 0
    assert field(reader, "general.name") == "tiny"
    assert {k: field(reader, f"gpt2.{k}") for k in ("context_length", "embedding_length",
                                                     "feed_forward_length", "block_count",
                                                     "attention.head_count")} == \
        {"context_length": c.n_ctx, "embedding_length": 64, "feed_forward_length": 256, "block_count": 2,
         "attention.head_count": c.n_head}
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    encoder = json.loads((OPENAI_124M / "encoder.json").read_text(encoding="utf-8"))
    assert tokens == sorted(encoder, key=encoder.get)
    merges = (OPENAI_124M / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and field(reader, "tokenizer.ggml.merges") == merges[1:]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[EOT] == gguf.TokenType.CONTROL and types[:EOT] == [gguf.TokenType.NORMAL] * EOT
    for key in ("bos", "eos", "unknown"):
        assert field(reader, f"tokenizer.ggml.{key}_token_id") == EOT


def test_gguf_f16_and_q8_0_round_only_the_matrices(full_pt, tmp_path, run_main):
    """f16: each matrix is ours rounded to float16, vectors and position embeddings float32 as they were;
    q8_0: each matrix in Q8_0 blocks, dequantized within one step (its block's largest |value| / 127)."""
    model, pt = full_pt
    ours = ours_as_llama_cpp(model)
    kept = {n for n, p in ours.items() if p.dim() == 1} | {"position_embd.weight"}
    for kind, qtype in (("f16", Q.F16), ("q8_0", Q.Q8_0)):
        reader = export(run_main, pt, tmp_path / f"{kind}.gguf", "--gguf-type", kind)
        assert field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[kind]
        for t in reader.tensors:
            p = ours[t.name]
            values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
            values = torch.from_numpy(values).reshape(p.shape)
            if t.name in kept:
                assert t.tensor_type == Q.F32 and torch.equal(values, p), t.name
            elif kind == "f16":
                assert t.tensor_type == Q.F16 and torch.equal(values, p.half().float()), t.name
            else:
                # 32 bytes and a float16 scale a block
                assert t.tensor_type == Q.Q8_0 and t.n_bytes == p.numel() // 32 * 34, t.name
                blocks = p.reshape(-1, 32)  # 32 values of a row each
                step = blocks.abs().amax(dim=1, keepdim=True) / 127
                assert ((values.reshape(-1, 32) - blocks).abs() <= step * 1.001).all(), t.name


@TENSORFLOW
def test_gguf_from_each_kind_of_model_file(full_pt, tmp_path, run_main):
    """OpenAI's TensorFlow folder, a Hugging Face folder and an instruction-tuned best.pt of the same weights
    give the same file, byte for byte: the same tensors and the same tokenizer (each source is named "tiny",
    as the file's general.name is)."""
    model, pt = full_pt  # .../tiny.pt
    openai = write_openai_checkpoint(tmp_path / "openai" / "tiny", hf_twin(model), n_ctx=model.config.n_ctx)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(OPENAI_124M / name, openai / name)
    hf, best = tmp_path / "hf" / "tiny", tmp_path / "best" / "tiny.pt"
    assert run_main("download_weights.py", "--export-hf", pt, hf).returncode == 0
    best.parent.mkdir()
    save_atomic(model.checkpoint(args={"lora_rank": 0}, val_loss=2.5, step=10), str(best))
    exported = [export(run_main, source, tmp_path / f"{i}.gguf", read=False).read_bytes()
                for i, source in enumerate((pt, openai, hf, best))]
    assert all(other == exported[0] for other in exported[1:])


def test_gguf_padded_vocabulary_gets_unused_filler_tokens(tmp_path, run_main):
    """nanoGPT's 50,304: ids past GPT-2's 50,257 become "[PAD<id>]" tokens of type unused (as llama.cpp's
    converter names them), their embedding rows kept."""
    save_atomic(tiny_model(seed=6, vocab_size=50304, n_embd=64).checkpoint(), str(tmp_path / "padded.pt"))
    reader = export(run_main, tmp_path / "padded.pt", tmp_path / "m.gguf")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 50304 and tokens[EOT] == "<|endoftext|>"
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert types[50257:] == [gguf.TokenType.UNUSED] * 47
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.shape.tolist() == [64, 50304]


def test_gguf_bad_input_is_one_line(full_pt, tmp_path, run_main, monkeypatch):
    """A classifier, a vocabulary smaller than GPT-2's, positions llama.cpp's GPT-2 does not have, a Hugging
    Face folder without config.json, an earlier file, a full disk: each one line, nothing written or lost."""
    _, pt = full_pt
    torch.save(finetune_spam.with_class_head(tiny_model(**FULL)).checkpoint(labels=finetune_spam.LABELS,
                                                                            pool="last", seed=1),
               tmp_path / "classifier.pt")
    save_atomic(tiny_model().checkpoint(), str(tmp_path / "small.pt"))  # 96 tokens
    assert run_main("download_weights.py", "--export-hf", pt, tmp_path / "hf").returncode == 0
    (tmp_path / "hf" / "config.json").unlink()
    out = tmp_path / "m.gguf"
    for source, said in ((tmp_path / "classifier.pt", "classifier.pt is a classifier (ham/spam)"),
                         (tmp_path / "small.pt", "has a vocabulary of 96 tokens, fewer than GPT-2's 50,257"),
                         (tmp_path / "hf", f"{tmp_path / 'hf' / 'config.json'} not found: a Hugging "
                                           "Face folder needs the config.json that came with its "
                                           "model.safetensors")):
        assert said in one_line_error(run_main("download_weights.py", "--export-gguf", source, out))
    assert not out.exists()
    rope = tiny_model(**FULL)
    rope.config.positions = "rope"  # a config this project may grow: llama.cpp's gpt2 cannot run it
    with pytest.raises(UserError, match="uses 'rope' positions; llama.cpp's GPT-2 .* learned position"):
        gguf_export.write_gguf(rope, Tokenizer(), str(out))
    assert not out.exists()

    export(run_main, pt, out)
    before = snapshot(tmp_path)
    line = one_line_error(run_main("download_weights.py", "--export-gguf", pt, out))
    assert f"{out} is from an earlier run and would be replaced" in line and "--overwrite" in line

    def full_disk(self, tensor, *args):  # as numpy's tofile reports a disk that fills up: a short write
        self.fout[0].write(tensor.tobytes()[:100])
        raise OSError(f"{tensor.nbytes} requested and 100 written")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    line = one_line_error(run_main("download_weights.py", "--export-gguf", pt, out, "--overwrite"))
    assert f"the disk is full: {out} could not be written (nothing was replaced)" in line
    assert snapshot(tmp_path) == before  # the earlier file whole, no temporary file left


def test_gguf_runs_in_llama_cpp_as_ours(full_pt, tmp_path, run_main, monkeypatch):
    """llama.cpp loads an f32 file with nothing beside it: it tokenizes text as tiktoken does, and its greedy
    20 tokens are ours. Its logits, for a model at GPT-2's initial scale, are ours to 1e-4 once our GELU is
    rounded as its float16 table rounds (its only rounding), and to 1e-3 without."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def llama(path):  # float32 keys and values in its cache (its default float16 would round them)
        return llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0,
                               flash_attn=False, n_threads=2, seed=0, verbose=False)
    model, pt = full_pt  # weights of 0.3: greedy choices with wide margins
    export(run_main, pt, tmp_path / "m.gguf", "--gguf-type", "f32")
    llm, tok = llama(tmp_path / "m.gguf"), Tokenizer()
    text = "Every effort moves you, naïvely, 1234 times!\n  <|endoftext|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    prompt, theirs = tok.encode(SAMPLE_PROMPT), []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(t)
        if len(theirs) == 20:
            break
    assert theirs == model.generate(torch.tensor([prompt]), 20, temperature=0)[0, len(prompt):].tolist()

    torch.manual_seed(7)
    model = GPT(GPTConfig(**FULL, n_head=4, n_layer=2, n_ctx=64)).eval()  # GPT-2's initial weights' scale
    save_atomic(model.checkpoint(), str(tmp_path / "init.pt"))
    export(run_main, tmp_path / "init.pt", tmp_path / "init.gguf", "--gguf-type", "f32")
    llm = llama(tmp_path / "init.gguf")
    ids = torch.randint(0, EOT, (40,)).tolist()
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0][0]
        monkeypatch.setattr(gpt2, "gelu", tabled_gelu)
        rounded = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(logits, rounded, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, exact, atol=1e-3, rtol=0)


def tabled_gelu(x):
    """GELU as llama.cpp's CPU code computes it: from a table of float16 values, indexed by the input rounded
    to float16 (inputs past +-10 give x and 0)."""
    y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
