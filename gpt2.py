"""GPT-2 in one file: tokenizer, model, generation and OpenAI's weights.

Read it top to bottom, in the order one learns it: text becomes token ids, ids
become vectors, attention lets each position look at the ones before it, blocks
of attention and feed-forward layers refine the vectors, and a final projection
turns them back into scores over the vocabulary. Needs torch and tiktoken;
TensorFlow only to read OpenAI's original checkpoints.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-pair encoding (BPE) turns text into ids and back.


class Tokenizer:
    """tiktoken's "gpt2" encoding (or another tiktoken Encoding, such as openai_tokenizer's)."""

    def __init__(self, enc=None):
        self.enc = enc or tiktoken.get_encoding("gpt2")
        self.eot_id = self.enc.eot_token  # <|endoftext|>, 50256: separates documents

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))


# -----------------------------------------------------------------------------
# Configuration: the four released sizes differ only in depth and width.

MODEL_SIZES = {  # name: (n_layer, n_head, n_embd)
    "124M": (12, 12, 768),
    "355M": (24, 16, 1024),
    "774M": (36, 20, 1280),
    "1558M": (48, 25, 1600),
}
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def size_name(name):
    """'gpt2-medium' or '355M' -> '355M'; anything else is an error that lists the names."""
    size = ALIASES.get(name, name)
    if size not in MODEL_SIZES:
        names = ", ".join([*MODEL_SIZES, *ALIASES])
        raise ValueError(f"unknown model size {name!r}: choose one of {names}")
    return size


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
    n_ctx: int = 1024  # longest sequence the model sees (its context window)
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0

    @classmethod
    def from_name(cls, name, **overrides):
        n_layer, n_head, n_embd = MODEL_SIZES[size_name(name)]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **overrides})


# -----------------------------------------------------------------------------
# Attention: each position mixes in the positions before it, weighted by how
# well its query matches their keys. Several heads do this side by side.


def attention(q, k, v, dropout=0.0, sees=None):
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, for queries (B, nh, T, hs) that are the last T
    of the S positions of keys and values (B, nh, S, hs) -> (output (B, nh, T, hs), weights (B, nh, T, S)).
    sees (B, 1, T, S), if given, replaces the causal mask: True where a query may look."""
    T, S = q.size(-2), k.size(-2)
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S): each query against each key
    if sees is None:
        sees = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # itself and earlier positions only
    att = F.softmax(att.masked_fill(~sees, float("-inf")), dim=-1)  # each row: weights summing to 1
    return F.dropout(att, dropout) @ v, att  # a weighted mix of the values


class KVCache:
    """The keys and values of the tokens seen so far in one layer, kept so that
    generating a token costs one position of work, not the whole prefix."""

    def __init__(self, batch_size, length, config, device, dtype):
        shape = (batch_size, config.n_head, length, config.n_embd // config.n_head)  # room for length positions
        self.k = torch.empty(shape, device=device, dtype=dtype)  # only [:, :, :len] is ever read
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.len = 0

    def append(self, k, v):  # (B, nh, T, hs) each; returns all keys and values so far
        T = k.size(2)
        self.k[:, :, self.len:self.len + T] = k
        self.v[:, :, self.len:self.len + T] = v
        self.len += T
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_weights, self.weights = False, None  # keep_weights: compute attention() and keep its weights

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs), S = cached + new positions
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights or mask is None and k.size(2) > T > 1:  # the formula above (to look at the weights, or chunks after a cache)
            y, self.weights = attention(q, k, v, dropout, mask)
        else:  # the same formula fused into one kernel (one new token after a cache sees everything)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Layer norm: rescales each position's vector to a steady size, so that a deep
# stack of layers trains.


class LayerNorm(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))  # OpenAI's "g"
        self.bias = nn.Parameter(torch.zeros(n_embd))  # OpenAI's "b"

    def forward(self, x):
        # (x - mean) / sqrt(var + 1e-5) * g + b over each vector's features, as one fused kernel
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=1e-5)


# -----------------------------------------------------------------------------
# GELU: the smooth nonlinearity between the two feed-forward layers.


def gelu(x):
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))), the tanh form GPT-2 was trained with, fused
    return F.gelu(x, approximate="tanh")


# -----------------------------------------------------------------------------
# Feed-forward: each position alone goes through a 4x wider layer and back.


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


# -----------------------------------------------------------------------------
# Transformer block: attention then feed-forward, each on a layer-normed copy of
# x and added back to x (pre-LN residuals keep gradients flowing through depth).


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model: token + position embeddings, n_layer blocks, a final layer norm, and
# the output head that shares its weights with the token embedding.


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} must be a multiple of n_head {config.n_head} (the heads split it)")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token id -> vector
            wpe=nn.Embedding(config.n_ctx, config.n_embd),  # position -> vector (learned)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: GPT-2 has one matrix for both
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def empty(cls, config):
        """A model whose weights are about to be overwritten: skips drawing random ones (seconds for big models)."""
        from unittest import mock  # nn.init's random draws (nn.Linear's, nn.Embedding's, ours) become no-ops
        skip = dict.fromkeys(("normal_", "uniform_", "kaiming_uniform_"), lambda tensor, *args, **kwargs: tensor)
        with mock.patch.multiple(nn.init, **skip):  # (not the meta device: its first use imports torch._dynamo, 2 s)
            return cls(config)  # the weights as torch.empty left them

    def hidden_states(self, idx, caches=None, pad=None):
        """(B, T) token ids -> (B, T, n_embd) final layer-normed vectors. pad (B,), if given, counts
        each row's padding tokens on the left, which no position attends to."""
        T = idx.size(1)
        start = caches[0].len if caches else 0  # positions continue after the cached tokens
        if start + T > self.config.n_ctx:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context window ({self.config.n_ctx})")
        pos, mask = torch.arange(start, start + T, device=idx.device), None  # (T,)
        if pad is not None:  # each row's positions count from its first real token, and padding is never seen
            keys = torch.arange(start + T, device=idx.device)  # (S,)
            real = (keys >= pad[:, None, None]) | (keys == pos[:, None])  # (B, T, S): a pad sees itself, so no row is empty
            mask = ((keys <= pos[:, None]) & real).unsqueeze(1)  # (B, 1, T, S): causal too, the same for every head
            pos = (pos - pad[:, None]).clamp(min=0)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size), and the cross-entropy loss if targets (B, T) are given (-100 = ignore)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------------------
    # Sampling: turn the last position's scores into the next token.

    @staticmethod
    def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
        """(B, vocab) scores -> (B, 1) token ids. temperature 0 picks the most likely token;
        top_k keeps the k likeliest; top_p keeps the fewest whose probabilities sum to p."""
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
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))  # vocab order
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)

    # -------------------------------------------------------------------------
    # Generation: predict a token, append it, repeat. The KV cache means each step
    # only runs the new token through the model.

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, pad=None):
        """Yield the next (B, 1) tokens one step at a time for prompts idx (B, T), left-padded by pad (B,)
        tokens if given. Rows that produced eos_id keep yielding eos_id; the stream ends when all have."""
        if idx.size(1) == 0:
            raise ValueError("the prompt is empty: give at least one token (<|endoftext|> starts a new document)")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature}")
        if top_k is not None and top_k < 1 or top_p is not None and not 0 <= top_p <= 1:
            raise ValueError(f"top_k must be >= 1 and top_p in [0, 1], or None; got top_k={top_k}, top_p={top_p}")
        n_ctx = self.config.n_ctx
        length = min(n_ctx, idx.size(1) + max_new_tokens)  # the most positions a cache holds
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        caches = None
        for _ in range(max_new_tokens):
            if caches is None or caches[0].len == n_ctx:
                # (Re)start: a prompt longer than the window keeps its last n_ctx tokens; once the window
                # is full, every position shifts each step, so the keys computed before no longer apply.
                cut, idx = max(idx.size(1) - n_ctx, 0), idx[:, -n_ctx:]
                pad = None if pad is None else (pad - cut).clamp(min=0)
                caches = [KVCache(idx.size(0), length, self.config, idx.device, self.lm_head.weight.dtype)
                          for _ in range(self.config.n_layer)]
                x = self.hidden_states(idx, caches, pad)
            else:
                x = self.hidden_states(idx[:, -1:], caches, pad)
            next_id = self.sample_next(self.lm_head(x[:, -1, :]), temperature, top_k, top_p)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(done, eos_id)
                done |= next_id == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
            if done.all():
                return

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None):
        """(B, T) prompts -> (B, T + n) with n <= max_new_tokens new tokens. temperature 0 = greedy.
        Or a list of prompts (lists of token ids) of any lengths -> a list of lists, each its prompt and new
        tokens (up to its first eos_id): run as one left-padded batch, each row as it would run alone."""
        if torch.is_tensor(idx):
            return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id)], dim=1)
        if not idx or not all(idx):
            raise ValueError("give a non-empty list of prompts, each at least one token")
        T, device = max(map(len, idx)), self.lm_head.weight.device
        batch = torch.tensor([[0] * (T - len(p)) + list(p) for p in idx], device=device)  # (B, T), padded on the left
        pad = torch.tensor([T - len(p) for p in idx], device=device)
        new = self.stream(batch, max_new_tokens, temperature, top_k, top_p, eos_id, pad)
        rows = torch.cat([batch[:, :0], *new], dim=1).tolist()  # (B, n) new tokens
        return [list(p) + (row[:row.index(eos_id) + 1] if eos_id in row else row) for p, row in zip(idx, rows)]

    # -------------------------------------------------------------------------
    # Weights: OpenAI's TensorFlow checkpoints, Hugging Face's GPT-2 folders, our own training checkpoints.

    # What this file computes, in transformers' GPT2Config: a config.json that says otherwise is another model.
    HF_CONFIG = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # theirs: (in, out)

    @staticmethod
    def openai_name(name):
        """Our parameter name -> OpenAI's: 'transformer.h.3.attn.c_attn.weight' -> 'model/h3/attn/c_attn/w'."""
        parts = name.removeprefix("transformer.").split(".")
        if parts[0] == "h":
            parts[:2] = [f"h{parts[1]}"]
        *path, leaf = parts
        if path in (["wte"], ["wpe"]):
            return f"model/{path[0]}"
        leaf = {"bias": "b", "weight": "g" if path[-1].startswith("ln") else "w"}[leaf]
        return "/".join(["model", *path, leaf])

    @classmethod
    def from_pretrained(cls, path):
        """A .pt file from train.py, a Hugging Face GPT-2 folder (config.json, model.safetensors) or
        OpenAI's (hparams.json, model.ckpt.*) -> GPT in eval mode. download_weights.py adds the first
        two to OpenAI's folders: read first where present, they need no TensorFlow."""
        if os.path.isfile(path):
            return cls.from_checkpoint(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} not found: pass a model folder or a .pt checkpoint")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return cls.from_safetensors(path)
        for name in ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{os.path.join(path, name)} not found: the checkpoint in {path} is incomplete")
        model, ckpt = cls.empty(cls.read_config(path)), os.path.join(path, "model.ckpt")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up logging off
        import tensorflow as tf  # only needed here, to read OpenAI's files

        reader = tf.train.load_checkpoint(ckpt)
        params = {cls.openai_name(k): p for k, p in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        found = reader.get_variable_to_shape_map()  # OpenAI stores linear layers as 1x1 convolutions: (1, in, out)
        expected = {k: (1, *p.shape[::-1]) if k.endswith("/w") else p.shape for k, p in params.items()}
        need = 4 * sum(math.prod(shape) for shape in found.values())  # float32
        cls.check_weights(ckpt, found, expected, ckpt + ".data-00000-of-00001", need)
        for name, p in params.items():
            array = reader.get_tensor(name)
            p.copy_(torch.from_numpy(array[0].T if name.endswith("/w") else array))  # (out, in), as nn.Linear's
        return model.eval()

    @classmethod
    def from_safetensors(cls, folder):
        """A Hugging Face GPT-2 folder -> GPT in eval mode. model.safetensors holds 8 bytes giving the
        length of a JSON index {name: dtype, shape, data_offsets}, the index, then the tensors' bytes,
        which are read straight into the parameters: loading takes little memory beyond the model's."""
        model, path = cls.empty(cls.read_config(folder)), os.path.join(folder, "model.safetensors")
        params = {k.removeprefix("transformer."): p for k, p in model.named_parameters()}  # the tied lm_head is wte
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        skip = ("__metadata__", ".attn.bias", ".attn.masked_bias", "lm_head.weight")  # old files' masks; the tied head
        with open(path, "rb") as f:
            try:  # names with "transformer." (as save_pretrained writes them) or without (the Hub's gpt2)
                index = json.loads(f.read(min(int.from_bytes(f.read(8), "little"), 100 << 20)))  # the format's cap
                found = {k.removeprefix("transformer."): (dtypes[v["dtype"]], v["shape"], v["data_offsets"][0])
                         for k, v in index.items() if not k.endswith(skip)}
                start = f.tell()
                need = start + max((v["data_offsets"][1] for k, v in index.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise ValueError(f"{path} is not a safetensors file of float tensors ({type(e).__name__})") from None
            expected = {k: p.shape[::-1] if k.endswith(cls.CONV1D) else p.shape for k, p in params.items()}
            cls.check_weights(path, {k: shape for k, (_, shape, _) in found.items()}, expected, path, need)
            for name, p in params.items():
                dtype, shape, offset = found[name]
                f.seek(start + offset)
                buf = torch.empty(shape, dtype=dtype) if name.endswith(cls.CONV1D) or dtype != p.dtype else p.data
                f.readinto(buf.view(torch.uint8).numpy())
                if name.endswith(cls.CONV1D):  # keep their (in, out) bytes: .t() is the (out, in) view nn.Linear
                    buf = buf.t()  # reads (no copy, and the faster layout for one token at a time, see bench.py)
                p.data = buf.to(p.dtype)  # (a no-op for float32)
        return model.eval()

    @staticmethod
    def check_weights(path, found, expected, data, need):
        """found and expected {name: shape}: every weight must be found, once, with its exact shape, and
        the data file hold the bytes the index lists; else a one-line ValueError naming the file."""
        if set(found) != set(expected):
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise ValueError(f"{path} does not match a GPT-2 of this size: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, shape in found.items():
            if tuple(shape) != tuple(expected[name]):
                raise ValueError(f"{name} in {path} has shape {list(shape)}, expected {list(expected[name])}")
        if os.path.getsize(data) < need:
            raise ValueError(f"{data} has {os.path.getsize(data):,} bytes, but its index lists {need:,}: "
                             "the file is incomplete (an interrupted download or copy); download it again")

    @classmethod
    def read_config(cls, folder):
        """The GPTConfig of a model folder: from config.json beside model.safetensors, else OpenAI's hparams.json."""
        hf = os.path.isfile(os.path.join(folder, "model.safetensors"))
        path = os.path.join(folder, "config.json" if hf else "hparams.json")
        try:
            with open(path, encoding="utf-8") as f:
                hp = json.load(f)
            vocab_size, n_ctx = (hp["vocab_size"], hp["n_positions"]) if hf else (hp["n_vocab"], hp["n_ctx"])
            sizes = dict(vocab_size=vocab_size, n_ctx=n_ctx, n_embd=hp["n_embd"], n_head=hp["n_head"], n_layer=hp["n_layer"])
            if not all(isinstance(n, int) and n > 0 for n in sizes.values()):
                raise TypeError(f"the sizes {sizes} must be positive integers")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not GPT-2's {os.path.basename(path)} ({type(e).__name__}: {e})") from None
        for key, ours in cls.HF_CONFIG.items():  # (hparams.json has none of these keys)
            if hp.get(key, ours) != ours:
                raise ValueError(f"{path} has {key} {hp[key]!r}; gpt2.py computes GPT-2 with {ours!r}")
        return GPTConfig(**sizes)

    @classmethod
    def from_checkpoint(cls, path):
        """A train.py checkpoint: {"config": GPTConfig as a dict, "model": state_dict, ...}."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights only: never runs code
        except Exception:
            ckpt = None
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path} is not a checkpoint of this project (a .pt written by train.py or the fine-tuning scripts)")
        ckpt["config"].pop("bias", None)  # written by the first release, always True
        model = cls.empty(GPTConfig(**ckpt["config"]))
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()[:300]
            raise ValueError(f"{path} does not fit its own config: {detail}") from None
        return model.eval()

    def checkpoint(self, **extra):
        """What from_checkpoint reads back: the config and the weights, plus anything in extra."""
        return {"config": asdict(self.config), "model": self.state_dict(), **extra}
