"""Models and their tokenizer, as the scripts load them: size names, model folders, .pt files."""

import contextlib
import json
import os
from dataclasses import asdict, replace
from glob import glob

import tiktoken

from errors import UserError
from gpt2 import GPT, MODELS_DIR, GPTConfig, Tokenizer, load_weights, size_name


def model_path(spec):
    """What --model names: an existing file or folder as it is; a size name (gpt2, 124M, ...) as
    models/<size>/."""
    if os.path.exists(spec):
        return spec
    try:
        return os.path.join(MODELS_DIR, size_name(spec))
    except ValueError:
        raise UserError(f"{spec} not found: pass a size name, a model folder (OpenAI's or Hugging Face's) "
                        "or a .pt checkpoint") from None


UNREAD_FORMATS = {"pytorch_model.bin": "transformers' older pickle format",
                  "model.safetensors.index.json": "weights sharded over several files"}


def check_format(path):
    """A model folder in a format gpt2.py does not read, or a Hugging Face folder without its config.json:
    one line saying how to make one it reads."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "hparams.json")):
        return
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{os.path.join(path, 'config.json')} not found: a Hugging Face folder needs the "
                            "config.json that came with its model.safetensors (for GPT-2's own sizes: "
                            "python download_weights.py --source huggingface)")
        return
    for name, what in UNREAD_FORMATS.items():
        if os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{os.path.join(path, name)}: {what} is not read here, only model.safetensors "
                            "whole (or OpenAI's files); write one with transformers: "
                            "GPT2LMHeadModel.from_pretrained(folder).save_pretrained(new_folder, "
                            "max_shard_size='100GB')")


def load_model(spec, reads_text=True):
    """A size name, a model folder (OpenAI's or Hugging Face's) or a .pt of ours -> GPT in eval mode.
    reads_text: it will read GPT-2's tokens, so its vocabulary must hold them all (a larger one, padded as
    nanoGPT pads it, is fine: generation never samples past them)."""
    check_format(model_path(spec))  # a clear line for a path that is not there, or not a format read here
    try:
        with quiet_stderr():  # TensorFlow, reading OpenAI's files, logs its start-up: not for our users
            model = GPT.from_pretrained(spec)
    except ValueError as e:  # gpt2.py's word for a file that is not a model it reads
        if "is a classifier" in str(e):
            raise UserError(f"{e}: it tells spam from ham, with  python finetune_spam.py --classify TEXT "
                            f"--out-dir {os.path.dirname(spec) or '.'}") from None
        raise UserError(str(e)) from None
    if reads_text and model.config.vocab_size < GPTConfig.vocab_size:
        raise UserError(f"{spec} has a vocabulary of {model.config.vocab_size:,} tokens, fewer than GPT-2's "
                        f"{GPTConfig.vocab_size:,}: it was not trained on GPT-2's tokens")
    return model


@contextlib.contextmanager
def quiet_stderr():
    """Silence what C++ libraries write to file descriptor 2 (TensorFlow logs there before any setting
    applies)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# OpenAI's tokenizer files: the same encoding as tiktoken's, built from the encoder.json that OpenAI
# ships beside the weights (no download needed). It would take gpt2.py past its 450 lines.

# GPT-2's pre-tokenizer: text is cut into words, numbers, punctuation runs and spaces before BPE
# (OpenAI's encoder.py pattern, in the equivalent possessive form tiktoken uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def byte_spelling():
    """byte -> the printable character GPT-2's tokenizer files (encoder.json, vocab.bpe, the Hub's
    vocab.json) spell it with: '!'..'~', '¡'..'¬' and '®'..'ÿ' as themselves, the other 68 bytes as
    chr(256), chr(257), ... in byte order. llama.cpp reads tokens and merges spelled this way."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(moved)}


def vocabulary_file(folder):
    """folder's token -> id table: OpenAI's encoder.json, or the same table as Hugging Face names it."""
    paths = [os.path.join(folder, name) for name in ("encoder.json", "vocab.json")]
    return next((path for path in paths if os.path.isfile(path)), None)


def openai_tokenizer(folder):
    """A Tokenizer from folder's encoder.json (token -> id), or vocab.json in a Hugging Face folder."""
    path = vocabulary_file(folder)
    if path is None:
        raise FileNotFoundError(f"{os.path.join(folder, 'encoder.json')} not found: GPT-2's tokenizer is "
                                "read from a model folder's encoder.json (or vocab.json)")
    with open(path, encoding="utf-8") as f:
        encoder = json.load(f)
    byte_of = {spelling: b for b, spelling in byte_spelling().items()}
    # OpenAI numbered the 256 bytes first, then each merge in the order it was learned (vocab.bpe's
    # lines), so a token's id is also its merge rank: lower merges first, which is all BPE needs.
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]})
    return Tokenizer(enc)


def load_tokenizer(spec=None):
    """GPT-2's tokenizer: from a model folder's encoder.json (or vocab.json) when spec names one (offline),
    else tiktoken's (downloaded once, then cached), else any downloaded model's encoder.json."""
    try:
        folder = model_path(spec) if spec else None
    except UserError:  # "scratch", or a file that is not there: tiktoken's then
        folder = None
    if folder and vocabulary_file(folder):  # (faster than tiktoken's own first load, too)
        return openai_tokenizer(folder)
    try:
        return Tokenizer()
    except OSError as e:  # requests' errors are OSErrors: offline, with nothing in tiktoken's cache
        local = sorted(glob(os.path.join(MODELS_DIR, "*", "encoder.json")))
        if local:
            return openai_tokenizer(os.path.dirname(local[0]))
        raise UserError(f"GPT-2's tokenizer files could not be downloaded ({type(e).__name__}): connect to "
                        "the internet once (tiktoken then caches them), set TIKTOKEN_CACHE_DIR to a folder "
                        "holding tiktoken's cache, or put a model folder with encoder.json in models/ "
                        "(python download_weights.py)") from None


def init_model(init_from, context_length=None, dropout=None, **size):
    """'scratch' -> a new GPT-2 124M with any of size's n_layer / n_head / n_embd / positions overrides;
    anything else -> load_model(init_from). context_length shortens the window (a pretrained
    model keeps its first positions), dropout sets the rate; None leaves either as it is."""
    size = {k: v for k, v in size.items() if v is not None}
    changes = {k: v for k, v in (("n_ctx", context_length), ("dropout", dropout)) if v is not None}
    if init_from == "scratch":
        return GPT(GPTConfig(**{**asdict(GPTConfig()), **size, **changes}))  # GPT checks n_embd % n_head
    if size:
        raise UserError(f"--{next(iter(size)).replace('_', '-')} only applies to --init-from scratch")
    model = load_model(init_from)
    if not changes:
        return model
    n_ctx = changes.get("n_ctx", model.config.n_ctx)
    if n_ctx > model.config.n_ctx:
        raise UserError(f"--context-length {n_ctx} is longer than {init_from}'s window of "
                        f"{model.config.n_ctx} positions: pass --context-length {model.config.n_ctx} or less")
    state = model.state_dict()
    if "transformer.wpe.weight" in state:  # (rotary positions have no table to cut)
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:n_ctx]
    return load_weights(GPT.empty(replace(model.config, **changes)), state, init_from)


def check_prerequisites(init_from, data, default_data):
    """Before any work, every missing thing a run needs in one line: the weights of a size name that
    download_weights.py has not fetched, and with them a --data that is not there."""
    lacking = []
    if init_from != "scratch" and not os.path.exists(init_from):
        folder = model_path(init_from)  # (a name that is no size is one line of its own)
        if not os.path.isdir(folder):
            size = os.path.basename(folder)
            lacking.append(f"GPT-2 {size}'s weights in {folder} (python download_weights.py --model {size})")
    if lacking and not os.path.exists(data):
        lacking.append(f"{data} (downloaded on first use when online; else put it there, or pass --data)"
                       if data == default_data else f"--data {data} (not found)")
    if lacking:  # (data alone missing: the script's own line says where it comes from)
        raise UserError(f"this run needs {' and '.join(lacking)}")
