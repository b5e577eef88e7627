"""GPT-2 in one file, in the order one learns it: text becomes token ids, ids become vectors, attention lets
each position look at the ones before it, blocks of attention and feed-forward layers refine them, and a final
projection scores the vocabulary; then sampling, generation and the weight files. Needs torch and tiktoken."""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-pair encoding (BPE) turns text into ids and back.
class Tokenizer:  # tiktoken's "gpt2" encoding, or any Encoding (offline: loading.py's openai_tokenizer)
    def __init__(self, enc=None):
        try:  # tiktoken downloads GPT-2's two BPE files once, into its cache
            self.enc = enc or tiktoken.get_encoding("gpt2")
        except OSError as e:  # (requests' errors are OSErrors) offline, with nothing in that cache
            raise OSError(f"{e}: offline, set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cache") from e
        self.eot_id = self.enc.eot_token  # <|endoftext|>, 50256: separates documents

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))


# -----------------------------------------------------------------------------
# Configuration: the four released sizes differ only in depth and width.
MODEL_SIZES = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280), "1558M": (48, 25, 1600)}
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}  # transformers'
MODELS_DIR = "models"  # download_weights.py's folder: a size's files are in models/<size>/


def size_name(name):  # 'gpt2-medium' or '355M' -> '355M'
    if ALIASES.get(name, name) not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}: choose one of {', '.join([*MODEL_SIZES, *ALIASES])}")
    return ALIASES.get(name, name)


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # 50,000 merges + 256 bytes + <|endoftext|> (nanoGPT pads it to 50,304)
    n_ctx: int = 1024  # longest sequence the model sees (its context window)
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0
    positions: str = "learned"  # GPT-2's learned vector per position, or "rope": rotary, see rope()
    tied_head: bool = True  # the head reuses wte's matrix (GPT-2's); False: its own (the book's GPTModel)

    def __post_init__(self):
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', not {self.positions!r}")

    @classmethod
    def from_name(cls, name, **overrides):
        n_layer, n_head, n_embd = MODEL_SIZES[size_name(name)]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


# -----------------------------------------------------------------------------
# Linear layers: a token of batch-1 generation is one row times each matrix. On AMD's CPUs MKL (torch's BLAS)
# runs that on one core, at half the memory's speed: Linear splits it over them all (bench.py's rows).
CPUINFO = Path("/proc/cpuinfo")  # Linux's description of the CPU, its vendor among it
AMD_CPU = CPUINFO.is_file() and "AuthenticAMD" in CPUINFO.read_text()


class Linear(nn.Linear):  # y = x Wᵀ + b, W (out, in)
    def forward(self, x):
        cores = torch.get_num_threads()
        one_row_on_amd = AMD_CPU and x.device.type == "cpu" and x.numel() == x.size(-1)
        if not one_row_on_amd or x.size(-1) % cores:
            return super().forward(x)
        # x's features in as many slices as cores, each times its rows of Wᵀ (in, out) on its core; summed
        y = torch.bmm(x.reshape(cores, 1, -1), self.weight.t().unflatten(0, (cores, -1))).sum(0)  # (1, out)
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)


# -----------------------------------------------------------------------------
# Attention: each position mixes in the positions before it, weighted by how
# well its query matches their keys. Several heads do this side by side.
def attention(q, k, v, dropout=0.0, sees=None):
    """softmax(q kᵀ / sqrt(hs) + mask) v for queries (B, nh, T, hs) at the last T of the S positions of keys
    and values (B, nh, S, hs); sees (B, 1, T, S), True where a query may look, replaces the causal mask."""
    T, S = q.size(-2), k.size(-2)
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S): each query against each key
    if sees is None:
        sees = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # itself and earlier ones
    att = F.softmax(att.masked_fill(~sees, float("-inf")), dim=-1)  # (B, nh, T, S), each row summing to 1
    return F.dropout(att, dropout) @ v, att  # (B, nh, T, hs): a weighted mix of the values; the weights


def rope(x, pos):
    """RoPE: each pair of features (i, i + hs/2) of x (B, nh, T, hs) turned by the angle pos / 10000^(2i/hs)
    for positions pos (T,) or (B, T). Then q_m · k_n depends on m - n alone: the scores see distance only."""
    hs = x.size(-1)
    freq = 1.0 / 10000 ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float) / hs)  # (hs/2,)
    angle = pos[..., None].float() * freq  # (T, hs/2) or (B, T, hs/2): fast turns first, slow ones last
    angle = torch.cat([angle, angle], dim=-1).unsqueeze(-3)  # (1 or B, 1, T, hs): both halves, every head
    x1, x2 = x.chunk(2, dim=-1)  # GPT-NeoX's, Llama's: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    return x * angle.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * angle.sin().to(x.dtype)


class KVCache:  # one layer's keys and values so far: a new token then costs one position of work
    def __init__(self, batch_size, length, config, device, dtype):
        shape = (batch_size, config.n_head, length, config.n_embd // config.n_head)  # room for length
        self.k = torch.empty(shape, device=device, dtype=dtype)  # only [:, :, :len] is ever read
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.len = 0

    def append(self, k, v):  # (B, nh, T, hs) each -> all the keys and values so far
        self.k[:, :, self.len:self.len + k.size(2)] = k
        self.v[:, :, self.len:self.len + k.size(2)] = v
        self.len += k.size(2)
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.rope = config.positions == "rope"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_weights, self.weights = False, None  # keep_weights: run attention() and keep its weights

    def forward(self, x, cache=None, mask=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = rope(q, pos), rope(k, pos)  # (B, nh, T, hs); the cache keeps keys turned
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs), S = cached + new positions
        dropout = self.dropout if self.training else 0.0
        # The fused kernel's causal mask lines the queries up with the first keys, not the last:
        # several new tokens after cached ones need the mask attention() writes out.
        chunk_after_cache = mask is None and 1 < T < k.size(2)
        if self.keep_weights or chunk_after_cache:
            y, self.weights = attention(q, k, v, dropout, mask)
        else:  # the same formula as one fused kernel (a single new token after a cache sees every key)
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Around attention: layer norm, GELU, the feed-forward layers, and the block that stacks them.
class LayerNorm(nn.Module):  # rescales each position's vector to a steady size, so a deep stack trains
    def __init__(self, n_embd):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))  # OpenAI's "g"
        self.bias = nn.Parameter(torch.zeros(n_embd))  # OpenAI's "b"

    def forward(self, x):  # (x - mean) / sqrt(var + 1e-5) * g + b over each vector's features, fused
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=1e-5)


def gelu(x):  # the smooth nonlinearity of the feed-forward layers, in the tanh form GPT-2 was trained with
    return F.gelu(x, approximate="tanh")  # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))), fused


class MLP(nn.Module):  # feed-forward: each position alone goes through a 4x wider layer and back
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


class Block(nn.Module):  # attention, then feed-forward, each on a layer-normed copy of x added back to x
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None, pos=None):
        x = x + self.attn(self.ln_1(x), cache, mask, pos)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model: token (+ position: not with RoPE) embeddings, n_layer blocks, a final layer norm, the head.
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} must be a multiple of n_head {config.n_head}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token id -> vector; wpe: position -> vector
            **({"wpe": nn.Embedding(config.n_ctx, config.n_embd)} if config.positions == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_head:  # GPT-2 has one matrix for both
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: residual projections get 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def empty(cls, config):
        """A GPT of shapes only, on the meta device (no memory), for load_weights to fill. Its random draws
        are skipped: they fill nothing, and on meta the first one imports torch._dynamo (about 1.5 s)."""
        from unittest import mock  # mock.patch.object: normal_ does nothing while the model is built
        with torch.device("meta"), mock.patch.object(torch.Tensor, "normal_", lambda t, *args, **kwargs: t):
            return cls(config)

    def hidden_states(self, idx, caches=None, pad=None):
        """(B, T) ids -> (B, T, n_embd) vectors. pad (B,): each row's padding on the left, seen by none."""
        T, start = idx.size(1), caches[0].len if caches else 0  # positions go on after the cached ones
        if start + T > self.config.n_ctx:
            raise ValueError(f"{start + T} tokens are longer than the context window ({self.config.n_ctx})")
        pos, mask = torch.arange(start, start + T, device=idx.device), None  # (T,)
        if pad is not None:  # each row's positions count from its first real token; padding is never seen
            keys = torch.arange(start + T, device=idx.device)  # (S,)
            real = (keys >= pad[:, None, None]) | (keys == pos[:, None])  # (B, T, S): a pad sees itself alone
            mask = ((keys <= pos[:, None]) & real).unsqueeze(1)  # (B, 1, T, S), causal too, for every head
            pos = (pos - pad[:, None]).clamp(min=0)  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        x = self.transformer.drop(x + self.transformer.wpe(pos) if self.config.positions == "learned" else x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None, mask, pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size), and the cross-entropy loss if targets (B, T) are given (-100: none)."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def checkpoint(self, **extra):  # what from_pretrained reads back from a .pt: config, weights, extra
        return {"config": asdict(self.config), "model": self.state_dict(), **extra}

    # Sampling: turn the last position's scores into the next token.
    @staticmethod
    def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
        """(B, vocab) scores -> (B, 1) ids: argmax at temperature 0, else drawn from top_k and/or top_p."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature  # < 1 sharpens the distribution, > 1 flattens it
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = F.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > top_p  # tokens whose predecessors already reach p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))  # in vocabulary order
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)

    # Generation: predict a token, append it, repeat; with the KV cache each step runs only the new token.
    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, pad=None):
        """Yield the next (B, 1) ids for prompts idx (B, T), left-padded by pad (B,) tokens if given; a row
        that has made eos_id makes it again, until all rows have and the stream ends."""
        if idx.size(1) == 0:
            raise ValueError("the prompt is empty: give at least one token (<|endoftext|> starts a document)")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature}")
        if (top_k is not None and top_k < 1) or (top_p is not None and not 0 <= top_p <= 1):
            raise ValueError(f"top_k must be >= 1 and top_p in [0, 1], or None, not {top_k} and {top_p}")
        n_ctx, caches, dtype = self.config.n_ctx, None, self.transformer.wte.weight.dtype  # (the cache's)
        length = min(n_ctx, idx.size(1) + max_new_tokens)  # the most positions a cache holds
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if caches is None or caches[0].len == n_ctx:
                # (re)start from the last n_ctx tokens: a full window moves every position each step
                cut, idx = max(idx.size(1) - n_ctx, 0), idx[:, -n_ctx:]
                pad = None if pad is None else (pad - cut).clamp(min=0)
                caches = [KVCache(idx.size(0), length, self.config, idx.device, dtype)
                          for _ in range(self.config.n_layer)]
            x = self.hidden_states(idx[:, caches[0].len:], caches, pad)  # what the caches have not seen
            logits = self.lm_head(x[:, -1, :])[:, :GPTConfig.vocab_size]  # no extra ids of a padded vocab
            next_id = self.sample_next(logits, temperature, top_k, top_p)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(done, eos_id)
                done |= next_id == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
            if done.all():
                return

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None):
        """A (B, T) tensor of prompts -> a (B, T + n) tensor, n <= max_new_tokens (temperature 0: greedy).
        A list of token-id lists of any lengths -> a list of lists, each cut after its first eos_id: they
        run as one batch padded on the left, each row as it would alone."""
        settings = (max_new_tokens, temperature, top_k, top_p, eos_id)
        if torch.is_tensor(prompts):
            return torch.cat([prompts, *self.stream(prompts, *settings)], dim=1)
        if not prompts or not all(prompts):
            raise ValueError("give a non-empty list of prompts, each at least one token")
        T, device = max(map(len, prompts)), self.transformer.wte.weight.device
        batch = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
        pad = torch.tensor([T - len(p) for p in prompts], device=device)
        rows = torch.cat([batch[:, :0], *self.stream(batch, *settings, pad)], dim=1).tolist()  # the new ids
        return [p + (row[:row.index(eos_id) + 1] if eos_id in row else row) for p, row in zip(prompts, rows)]

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name):
        """A size name (MODELS_DIR/<size>/), a .pt of ours, a Hugging Face or OpenAI folder -> GPT (eval)."""
        if name in (*MODEL_SIZES, *ALIASES) and not os.path.exists(name):
            size, name = size_name(name), os.path.join(MODELS_DIR, size_name(name))
            if not os.path.isdir(name):
                raise FileNotFoundError(f"{name} not found: run  python download_weights.py --model {size}")
        if os.path.isfile(name):
            config, state = read_pt(name)
        elif os.path.isfile(os.path.join(name, "model.safetensors")):
            config, state = read_hf(name)
        elif os.path.isfile(os.path.join(name, "hparams.json")):
            config, state = read_openai(name)
        else:
            raise FileNotFoundError(f"{name}: neither a .pt of ours nor a folder with config.json + model."
                                    "safetensors (Hugging Face's) or hparams.json + model.ckpt.* (OpenAI's)")
        return load_weights(cls.empty(config), state, name).eval()

    @staticmethod
    def openai_name(name):
        """Our name -> OpenAI's: 'transformer.h.3.attn.c_attn.weight' -> 'model/h3/attn/c_attn/w'."""
        parts = name.removeprefix("transformer.").split(".")
        if parts[0] == "h":
            parts[:2] = [f"h{parts[1]}"]
        *path, leaf = parts
        if path in (["wte"], ["wpe"]):
            return f"model/{path[0]}"
        leaf = {"bias": "b", "weight": "g" if path[-1].startswith("ln") else "w"}[leaf]
        return "/".join(["model", *path, leaf])


# -----------------------------------------------------------------------------
# Weights: a reader per format -> (GPTConfig, state dict in our names); load_weights checks and loads it.
# What this file computes, in transformers' GPT2Config: a config.json that says otherwise is another model.
HF_CONFIG = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "tie_word_embeddings": True}


def read_config(path):
    """GPTConfig from Hugging Face's config.json or OpenAI's hparams.json (their names for the same sizes)."""
    try:
        with open(path, encoding="utf-8") as f:
            hp = json.load(f)
        sizes = [hp.get("vocab_size", hp.get("n_vocab")), hp.get("n_positions", hp.get("n_ctx"))]
        sizes += [hp["n_embd"], hp["n_head"], hp["n_layer"]]
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            raise TypeError(f"the sizes {sizes} must be positive integers")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, a key missing, not numbers
        raise ValueError(f"{path} holds no GPT-2 config ({type(e).__name__}: {e})") from None
    for key, ours in HF_CONFIG.items():  # (hparams.json has none of these keys)
        if hp.get(key, ours) != ours:
            raise ValueError(f"{path} has {key} {hp[key]!r}; gpt2.py computes GPT-2 with {ours!r}")
    return GPTConfig(*sizes)


def read_openai(folder):
    """OpenAI's TensorFlow checkpoint: hparams.json and model.ckpt.{index,data-00000-of-00001}."""
    config, ckpt = read_config(os.path.join(folder, "hparams.json")), os.path.join(folder, "model.ckpt")
    for name in (ckpt + ".index", ckpt + ".data-00000-of-00001"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name} not found: the checkpoint in {folder} is incomplete")
    import tensorflow as tf  # needed only here
    reader = tf.train.load_checkpoint(ckpt)
    try:
        arrays = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    except (IndexError, tf.errors.OpError) as e:  # a data file cut short ("Read less bytes ...") or damaged
        raise ValueError(f"{ckpt}.data-00000-of-00001 is cut short or damaged ({e}): download it") from None
    ours = {GPT.openai_name(k): k for k in GPT.empty(config).state_dict()}  # OpenAI's names -> ours
    # linear layers are stored as 1x1 convolutions, (1, in, out): a[0].T is nn.Linear's (out, in) view
    return config, {ours.get(k, k): torch.from_numpy(a[0].T if a.ndim == 3 else a) for k, a in arrays.items()}


def read_hf(folder):
    """Hugging Face's config.json + model.safetensors (memory-mapped), named as save_pretrained or the Hub."""
    import safetensors.torch  # needed only here
    config, path = read_config(os.path.join(folder, "config.json")), os.path.join(folder, "model.safetensors")
    try:
        tensors = safetensors.torch.load_file(path)  # each page is read from disk when first used
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a whole safetensors file ({e})") from None
    skip = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # older files' causal masks; the tied head
    state = {k.removeprefix("transformer."): t for k, t in tensors.items() if not k.endswith(skip)}
    return config, {"transformer." + k: t.t() if k.endswith(GPT.CONV1D) else t for k, t in state.items()}


def read_pt(path):
    """Ours, as the scripts write it: {"config": GPTConfig as a dict, "model": state dict, ...}."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # weights only: no code
        config = GPTConfig(**ckpt["config"])
    except Exception:
        raise ValueError(f"{path} is not a checkpoint of this project (a .pt the scripts write)") from None
    if "labels" in ckpt:  # finetune_spam.py's
        raise ValueError(f"{path} is a classifier ({'/'.join(ckpt['labels'])}), not a language model")
    return config, ckpt["model"]


def contiguous(t):  # copied 128 columns at a time a transpose stays in cache: twice .contiguous()'s speed
    if t.is_contiguous():
        return t
    out = torch.empty(t.shape, dtype=t.dtype)
    for j in range(0, t.size(-1), 128):
        out[..., j:j + 128] = t[..., j:j + 128]
    return out


def load_weights(model, state, source):
    """Check state {name: tensor} against model (each weight there, shaped alike; a tied head may be left
    out), then make it model's weights: float32, laid out as AMD_CPU's comment says, whatever the file."""
    wanted = {k: p.shape for k, p in model.named_parameters()}  # a tied head is wte, named once
    state = {k: t for k, t in state.items() if k in wanted or k != "lm_head.weight"}  # (a .pt has it twice)
    missing, extra = sorted(wanted.keys() - state.keys()), sorted(state.keys() - wanted.keys())
    if missing or extra:
        raise ValueError(f"{source} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in state.items():
        if t.shape != wanted[name] or not t.is_floating_point():
            raise ValueError(f"{name} in {source} holds {t.dtype} numbers of shape {list(t.shape)}, "
                             f"not weights of shape {list(wanted[name])}")
        in_out = AMD_CPU and t.dim() == 2  # (in, out) bytes, as Linear's split reads them fastest there
        state[name] = contiguous(t.float().t()).t() if in_out else contiguous(t.float())
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: the tied head, checked above
    if "lm_head.weight" not in wanted:
        model.lm_head.weight = model.transformer.wte.weight  # assign gave wte a new Parameter: tie them again
    return model

