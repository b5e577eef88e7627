"""The peers bench.py measures gpt2.py against, on the same weights: transformers' GPT2LMHeadModel and
CTranslate2, a C++ engine for inference. Each is imported late: gpt2.py's loading rows must not carry it."""

import os
import sys
from functools import partial
from types import SimpleNamespace

import torch

from gpt2 import GPT, GPTConfig, load_weights


def make_ours(n_layer, n_head, n_embd, seed):
    """Random GPT-2 weights (the same for a given seed), laid out as from_pretrained leaves any file
    (load_weights), as a user who loads weights has them."""
    torch.manual_seed(seed)
    fresh = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    return load_weights(GPT.empty(fresh.config), fresh.state_dict(), "random weights").eval()


def make_models(n_layer, n_head, n_embd, seed):
    """make_ours' model and transformers' GPT2LMHeadModel with the same weights -> (ours, theirs)."""
    # imported late: gpt2.py's loading row must not carry it
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # its notes on our flags would land among the rows
    ours = make_ours(n_layer, n_head, n_embd, seed)
    c = ours.config
    theirs = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ))
    theirs.load_state_dict({k: v.t() if k.endswith(GPT.CONV1D) else v for k, v in ours.state_dict().items()})
    return ours, theirs.eval()


@torch.no_grad()
def generate(model, idx, new_tokens, top_k, autocast):
    """new_tokens greedy (top_k None) or top-k sampled tokens after idx, no early stop."""
    with autocast:
        if isinstance(model, GPT):
            return model.generate(idx, new_tokens, temperature=0 if top_k is None else 1.0, top_k=top_k)
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=top_k is not None, top_k=top_k, max_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=model.config.eos_token_id)
        return model.generate(idx, attention_mask=torch.ones_like(idx), generation_config=config)


@torch.no_grad()
def generate_ragged(model, prompts, new_tokens, autocast):
    """new_tokens greedy tokens after each of prompts (token-id lists of different lengths), as one
    batch padded on the left: ours takes the lists; transformers takes the padded ids and a mask."""
    with autocast:
        if isinstance(model, GPT):
            return model.generate(prompts, new_tokens, temperature=0)
        from transformers import GenerationConfig

        T, device = max(map(len, prompts)), model.device
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=0)
        return [p + row[T:] for p, row in zip(prompts, model.generate(ids, attention_mask=mask,
                                                                      generation_config=config).tolist())]


def installed(module):
    """A peer is measured only where it is installed: CTranslate2 (requirements-test.txt has it) and
    llama.cpp ("llama_cpp": llama-cpp-python, built from source)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def import_ctranslate2():
    """ctranslate2, bound to its own OpenMP runtime."""
    # CTranslate2 ships its own OpenMP, but loaded plainly its calls bind to torch's, loaded first and global:
    # its threads then join torch's pool, which, with more threads than cores, stops spin-waiting between
    # parallel regions (ours ran 0.7-0.8x as fast after CTranslate2's first run, and CTranslate2 itself
    # slower too). Bound deep, each engine keeps its own OpenMP, as it has in a process of its own.
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))  # Linux's; elsewhere nothing to keep apart
    try:
        import ctranslate2
    finally:
        sys.setdlopenflags(flags)
    return ctranslate2


def ctranslate2_generator(theirs, folder, compute_type):
    """transformers' model -> CTranslate2's Generator on the same weights, converted into folder once, in
    compute_type ("float32", "int8": its int8 weights, one scale per row, float32 activations). Its
    tokens are the ids written as strings: no tokenizer files needed."""
    ctranslate2 = import_ctranslate2()
    from ctranslate2.converters.transformers import GPT2Loader

    if not os.path.isdir(folder):
        ids = [str(i) for i in range(theirs.config.vocab_size)]
        eos = str(theirs.config.eos_token_id)
        tokenizer = SimpleNamespace(bos_token=eos, eos_token=eos, unk_token=eos,
                                    get_vocab=lambda: {s: i for i, s in enumerate(ids)})
        with torch.no_grad():
            spec = GPT2Loader()(theirs, tokenizer)
        spec.validate()
        spec.optimize(quantization=compute_type)
        os.makedirs(folder + ".tmp", exist_ok=True)
        spec.save(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    return ctranslate2.Generator(folder, device="cpu", compute_type=compute_type,
                                 intra_threads=torch.get_num_threads())


def generate_ctranslate2(generator, idx, new_tokens):
    """new_tokens greedy tokens after idx (1, T), no early stop -> (1, T + new_tokens), as generate's."""
    prompt = [str(i) for i in idx[0].tolist()]
    result = generator.generate_batch([prompt], max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False, end_token=[])
    return torch.cat([idx, torch.tensor(result[0].sequences_ids, device=idx.device)], dim=1)


def llama_cpp_model(ours, path, gguf_type):
    """llama.cpp on our GGUF export of ours (gguf_export.py), written to path once: f32, or q8_0 (int8 in
    blocks of 32, one scale each). Its keys and values cached in float32, as ours are. Its OpenMP is
    libgomp.so.1, the name torch's runtime already holds: unlike CTranslate2's, it joins torch's pool."""
    import llama_cpp

    from gguf_export import write_gguf
    from gpt2 import Tokenizer

    if not os.path.isfile(path):
        write_gguf(ours, Tokenizer(), path + ".tmp", gguf_type)
        os.replace(path + ".tmp", path)
    return llama_cpp.Llama(model_path=path, n_ctx=ours.config.n_ctx, type_k=0, type_v=0, flash_attn=False,
                           n_threads=torch.get_num_threads(), seed=0, verbose=False)


def generate_llama_cpp(llm, idx, new_tokens):
    """new_tokens greedy tokens after idx (1, T), no early stop -> (1, T + new_tokens), as generate's."""
    new = []
    for token in llm.generate(idx[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        new.append(token)
        if len(new) == new_tokens:
            break
    return torch.cat([idx, torch.tensor([new], device=idx.device)], dim=1)


def start_engine(name, kind, ours, theirs, root):
    """CTranslate2 or llama.cpp on the model's weights, converted into root once -> its generate(idx,
    new_tokens), greedy."""
    if name == "CTranslate2":
        folder = os.path.join(root, f"ctranslate2-{kind}")
        return partial(generate_ctranslate2, ctranslate2_generator(theirs, folder, kind))
    path = os.path.join(root, f"llama-cpp-{kind}.gguf")
    return partial(generate_llama_cpp, llama_cpp_model(ours, path, kind))
