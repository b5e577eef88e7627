"""A model of this project as one GGUF file, the format llama.cpp (and Ollama, which runs it) reads: the
weights under the names of llama.cpp's gpt2 architecture, its sizes, and GPT-2's tokenizer (tokens, their
types and the BPE merges), so that the file needs nothing beside it. Written with the gguf package, one
tensor at a time."""

import functools

import gguf
import numpy as np
import torch

from errors import UserError
from gpt2 import GPTConfig
from loading import byte_spelling

# --gguf-type: the file type it declares, and the type of its matrices. Vectors (biases, layer norms) and the
# position embedding stay float32, as llama.cpp's own converter keeps them; a matrix whose rows do not split
# into Q8_0's blocks of 32 falls back to float16, as there.
TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
         "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
         "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}
LAYER_NORM_EPS = 1e-5  # GPT-2's (gpt2.LayerNorm)


def merged_from(piece, ranks):
    """The two tokens whose merge made piece: BPE on its bytes with only the merges learned before it (a
    token's id is its merge rank) ends at exactly those two."""
    parts, rank = [piece[i:i + 1] for i in range(len(piece))], ranks[piece]
    while len(parts) > 2:
        pairs = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
        i = min(range(len(pairs)), key=pairs.__getitem__)
        if pairs[i] >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {rank} ({piece!r}) is not the merge of two earlier tokens")
    return parts


def vocabulary(tokenizer, vocab_size):
    """GPT-2's tokenizer as llama.cpp reads it -> (tokens, token types, merges): each token spelled as in
    byte_spelling, <|endoftext|> a control token, the 50,000 merges in the order they were learned (rebuilt
    from tiktoken's ranks). Ids past GPT-2's 50,257 (a padded vocabulary) become unused filler tokens
    "[PAD<id>]", as llama.cpp's converter writes them for a padded vocabulary."""
    enc = tokenizer.enc
    special = frozenset(enc.encode_single_token(s) for s in enc.special_tokens_set)
    pieces = tuple(enc.decode_single_token_bytes(i) for i in range(enc.n_vocab))
    tokens, types, merges = spelled(pieces, special)
    pad = range(enc.n_vocab, vocab_size)
    return [*tokens, *(f"[PAD{i}]" for i in pad)], [*types, *[gguf.TokenType.UNUSED] * len(pad)], list(merges)


@functools.lru_cache(maxsize=1)  # 4 s, and the same for every export in a process (bench.py makes two)
def spelled(pieces, special):
    """The tokens, their types and the merges of a tokenizer whose token i is pieces[i] (bytes)."""
    spell = byte_spelling()
    ranks = {p: i for i, p in enumerate(pieces) if i not in special}
    tokens, types, merges = [], [], []
    for i, piece in enumerate(pieces):
        if i in special:
            tokens.append(piece.decode("utf-8"))
            types.append(gguf.TokenType.CONTROL)
            continue
        tokens.append("".join(spell[b] for b in piece))
        types.append(gguf.TokenType.NORMAL)
        if len(piece) > 1:
            merges.append(" ".join("".join(spell[b] for b in part) for part in merged_from(piece, ranks)))
    return tuple(tokens), tuple(types), tuple(merges)


def check_representable(model):
    """Refuse, in one line, a model that llama.cpp's gpt2 architecture would compute differently."""
    c = model.config
    if c.positions != "learned":
        raise UserError(f"the model uses {c.positions!r} positions; llama.cpp's GPT-2 (and GGUF's gpt2 "
                        "architecture) has learned position embeddings only: it runs here, with sample.py")
    if not c.tied_head:
        raise UserError("the model has an output head of its own (train.py --init book), where GPT-2's "
                        "reuses the token embedding: it runs here, with sample.py")
    if c.vocab_size < GPTConfig.vocab_size:
        raise UserError(f"the model has a vocabulary of {c.vocab_size:,} tokens, fewer than GPT-2's "
                        f"{GPTConfig.vocab_size:,}: GGUF's GPT-2 tokenizer would name tokens it does not "
                        "have")


def gguf_tensors(model, qtype):
    """(GGUF name, float32 array in nn.Linear's (out, in) layout, the type it is stored as) for each weight:
    the tied output head is token_embd itself (llama.cpp reads it so when there is no output.weight)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        array = p.detach().to(torch.float32).numpy()
        kept_f32 = array.ndim == 1 or new_name == "position_embd.weight"
        wanted = gguf.GGMLQuantizationType.F32 if kept_f32 else qtype
        if wanted == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            wanted = gguf.GGMLQuantizationType.F16
        yield new_name, array, wanted


def stored(array, qtype, name):
    """array as qtype's bytes, in C order (llama.cpp's row-major layout)."""
    data = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
    if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
        raise UserError(f"{name} holds values past float16's range (65,504): export with --gguf-type f32 "
                        "or q8_0")
    return data


def nbytes(shape, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]  # (values per block, bytes per block)
    return int(np.prod(shape)) // block * size


def write_gguf(model, tokenizer, path, gguf_type="f16", name="gpt2"):
    """Write model and GPT-2's tokenizer into path as a GGUF file of gguf_type (f32, f16, q8_0), with the
    keys llama.cpp reads for its gpt2 architecture. One tensor is converted at a time: no second copy of
    the model."""
    check_representable(model)
    file_type, qtype = TYPES[gguf_type]
    c = model.config
    tokens, types, merges = vocabulary(tokenizer, c.vocab_size)
    w = gguf.GGUFWriter(path, "gpt2")  # general.architecture
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer pattern
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_unk_token_id):
        add(tokenizer.eot_id)  # GPT-2 has one special token, <|endoftext|>, for all three
    plan = list(gguf_tensors(model, qtype))
    for new_name, array, wanted in plan:
        w.add_tensor_info(new_name, array.shape, np.dtype(np.float32), nbytes(array.shape, wanted),
                          raw_dtype=wanted)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for new_name, array, wanted in plan:
            w.write_tensor_data(stored(array, wanted, new_name))
    finally:
        w.close()
