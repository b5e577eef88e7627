"""Look inside a GPT-2: its weights, its attention, its token embeddings and its predictions.

    python explore.py --model models/124M --weights     # OpenAI's 124M layer by layer (the index is enough)
    python explore.py --model out/best.pt --attention "To be, or not to be" --layer 1 --head 2
    python explore.py --model gpt2 --neighbors king --analogy "king - man + woman"
    python explore.py --model gpt2 --words king queen man woman Paris London France England
    python explore.py --model out/best.pt \\
        --next "First Citizen: Before we proceed any further, hear me speak."

--model is what sample.py takes: a size name (weights from download_weights.py), an OpenAI
model folder or a .pt of this project. Each view prints a short summary; the pictures
(attention heatmaps, a 2-D map of word embeddings, surprisal per token) go into --out-dir.
A word (--neighbors, --analogy, --words) is read as it appears after a space in running text
(' king'), and must be a single token.
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import math
import os
import re

import torch
from torch.nn import functional as F

from cli import add_renamed, argument_parser, number
from errors import UserError, run
from gpt2 import GPT, MODEL_SIZES, GPTConfig, read_config
from loading import load_model, load_tokenizer, model_path, quiet_stderr
from plots import pyplot, save_figure

LABEL_CHARS = 12  # longest token label drawn on an axis


# -----------------------------------------------------------------------------
# Weights: every tensor by our name and OpenAI's, and how many numbers each holds.


def skeleton(config):
    """A GPT with shapes and no weights (meta tensors): free to build, even for 1558M."""
    with torch.device("meta"):
        return GPT(config)


def count_parameters(config):
    return sum(p.numel() for p in skeleton(config).parameters())  # parameters(): the tied head once


def index_tensors(folder):
    """[(our name, shape, OpenAI's shape)] of an OpenAI checkpoint, from hparams.json and the index alone
    (the data file is not read, nor needed)."""
    with quiet_stderr():  # TensorFlow's start-up log
        import tensorflow as tf  # only here: OpenAI's index is a TensorFlow file

    config = read_config(os.path.join(folder, "hparams.json"))
    found = {name: tuple(shape)
             for name, shape in tf.train.list_variables(os.path.join(folder, "model.ckpt"))}
    tensors = []
    for name, p in skeleton(config).named_parameters():
        tf_name = GPT.openai_name(name)
        if math.prod(found.get(tf_name, ())) != p.numel():  # (the same numbers, maybe in another layout)
            has = list(found[tf_name]) if tf_name in found else "nothing by that name"
            raise UserError(f"{folder}: {tf_name} should hold the {p.numel():,} numbers of {name}, the "
                            f"index has {has}")
        tensors.append((name, tuple(p.shape), found[tf_name]))
    return tensors


def model_tensors(spec):
    """[(our name, shape, OpenAI's shape)] of every tensor of --model, the tied output head once.
    An OpenAI folder (or a size name's) is read from its index, with its shapes; anything else is loaded."""
    folder = model_path(spec)
    if os.path.isfile(os.path.join(folder, "model.ckpt.index")):
        return index_tensors(folder)
    # OpenAI stores the blocks' linear layers as 1x1 convolutions, (1, in, out); the rest as we do
    return [(name, tuple(p.shape), (1, *p.shape[::-1]) if name.endswith(GPT.CONV1D) else tuple(p.shape))
            for name, p in load_model(spec, reads_text=False).named_parameters()]


def group(name):
    """'transformer.h.3.attn.c_attn.weight' -> 'h.3'; the embeddings and ln_f are groups of their own."""
    parts = name.removeprefix("transformer.").split(".")
    return (f"h.{parts[1]}" if parts[0] == "h"
            else {"wte": "embeddings", "wpe": "embeddings"}.get(parts[0], parts[0]))


def show_weights(spec):
    tensors = model_tensors(spec)
    print(f"{spec}: {len(tensors)} tensors")
    print(f"{'our name':<40} {'OpenAI name':<28} {'shape':>10} {'OpenAI shape':>12} {'parameters':>12}")
    totals = {}
    for name, shape, theirs in tensors:
        n = math.prod(shape)
        totals[group(name)] = totals.get(group(name), 0) + n
        print(f"{name:<40} {GPT.openai_name(name):<28} {'x'.join(map(str, shape)):>10} "
              f"{'x'.join(map(str, theirs)):>12} {n:>12,}")
    print("\nper block (and the embeddings, the final layer norm):")
    for name, n in totals.items():
        print(f"  {name:<12} {n:>12,}")
    print(f"total: {sum(totals.values()):,} parameters (the output head is wte itself: counted once)")
    print("\nthe four released sizes (counted from their configs, no weights allocated):")
    print(f"  {'size':<6} {'layers':>6} {'heads':>6} {'width':>6} {'parameters':>14}")
    for size in MODEL_SIZES:
        c = GPTConfig.from_name(size)
        print(f"  {size:<6} {c.n_layer:>6} {c.n_head:>6} {c.n_embd:>6} {count_parameters(c):>14,}")


# -----------------------------------------------------------------------------
# Text and words -> token ids, and token ids -> labels.


def encode_text(tokenizer, model, text, view):
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise UserError(f"{view} needs a text of at least 2 tokens, got {len(ids)}")
    if len(ids) > model.config.n_ctx:
        raise UserError(f"{view}: the text is {len(ids)} tokens, longer than the model's context window "
                        f"({model.config.n_ctx}): shorten it")
    return ids


def word_id(tokenizer, word):
    """'king' -> the id of ' king', the word as it appears after a space in running text."""
    if not word.strip():
        raise UserError(f"{word!r} is not a word: give one such as king")
    text = word if word[:1].isspace() else " " + word
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = " + ".join(repr(tokenizer.decode([i])) for i in ids)
        raise UserError(f"{text!r} is {len(ids)} tokens ({pieces}), not one: choose a word that is a "
                        "single token")
    return ids[0]


def label(tokenizer, i):
    """A token as an axis label: newlines visible, long ones cut."""
    text = tokenizer.decode([i]).replace("\n", "\\n")
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"


# -----------------------------------------------------------------------------
# Attention: the weights gpt2.py's own attention() computes, kept by each layer.


@torch.no_grad()
def attention_weights(model, ids):
    """Token ids -> (n_layer, n_head, T, T): row q holds how much token q takes from each token k <= q."""
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.keep_weights = True  # the written-out formula, which keeps its softmax
    try:
        model(torch.tensor([ids]))
    finally:
        for attn in layers:
            attn.keep_weights = False
    return torch.stack([attn.weights[0] for attn in layers])


def heatmap(ax, weights, labels, title, xlabels=True, ylabels=True):
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels if xlabels else [], rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels if ylabels else [], fontsize=8)
    ax.set_title(title, fontsize=10)


def show_attention(model, tokenizer, text, layer, head, out):
    n_layer, n_head = model.config.n_layer, model.config.n_head
    if layer >= n_layer or head >= n_head:
        raise UserError(f"--layer {layer} --head {head}: the model has layers 0-{n_layer - 1} and heads "
                        f"0-{n_head - 1}")
    ids = encode_text(tokenizer, model, text, "--attention")
    weights = attention_weights(model, ids)[layer]  # (n_head, T, T)
    labels = [label(tokenizer, i) for i in ids]
    plt = pyplot()

    size = max(4, 2 + 0.3 * len(ids))  # inches: room for the token labels
    fig, ax = plt.subplots(figsize=(size, size))
    heatmap(ax, weights[head], labels, f"layer {layer}, head {head}")
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel("token (query)")
    fig.colorbar(ax.images[0], ax=ax, shrink=0.8)
    fig.tight_layout()
    one = save_figure(fig, os.path.join(out, f"attention-layer{layer}-head{head}.png"), bbox_inches="tight")

    cols = math.ceil(math.sqrt(n_head))
    rows = math.ceil(n_head / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size * 0.7, rows * size * 0.7), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h < n_head:
            heatmap(ax, weights[h], labels, f"head {h}", xlabels=h >= n_head - cols, ylabels=h % cols == 0)
        else:
            ax.axis("off")
    fig.suptitle(f"layer {layer}, all {n_head} heads\n(row: a token; column: what it attends to)")
    fig.tight_layout()
    grid = save_figure(fig, os.path.join(out, f"attention-layer{layer}.png"), bbox_inches="tight")

    print(f"layer {layer}, head {head} ({one}): each token and the token it attends to most")
    for q, row in enumerate(weights[head]):
        k = row.argmax().item()
        print(f"  {tokenizer.decode([ids[q]])!r:>16} -> {tokenizer.decode([ids[k]])!r:<16} "
              f"{row[k].item():.2f}")
    print(f"layer {layer}, all heads ({grid}): mean weight on itself / the previous token / the first token")
    for h, w in enumerate(weights):  # over tokens 1..T-1: token 0 can only attend to itself
        print(f"  head {h:>2}: {w.diagonal()[1:].mean():.2f} / {w.diagonal(-1).mean():.2f} / "
              f"{w[1:, 0].mean():.2f}")


# -----------------------------------------------------------------------------
# Embeddings: the rows of wte compared by cosine similarity.


def token_embeddings(model):  # (V, C): the rows of GPT-2's tokens (a padded vocabulary's extra rows left out)
    return model.transformer.wte.weight[:GPTConfig.vocab_size]


def nearest(embeddings, vector, k, exclude=()):
    """The k rows of embeddings (V, C) most similar to vector (C,) by cosine -> [(id, similarity)]; fewer
    where fewer rows are left once exclude's are."""
    similarity = F.cosine_similarity(embeddings, vector[None], dim=-1)
    similarity[list(exclude)] = -math.inf
    top = similarity.topk(min(k, len(embeddings) - len(set(exclude))))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def parse_sum(expression):
    """'king - man + woman' -> [(1, 'king'), (-1, 'man'), (1, 'woman')]."""
    parts = re.split(r"\s+([+-])\s+", expression.strip())
    if len(parts) < 3:
        raise UserError(f"--analogy {expression!r}: write words joined by ' - ' and ' + ', such as "
                        "'king - man + woman'")
    return [(1, parts[0])] + [(1 if op == "+" else -1, word) for op, word in zip(parts[1::2], parts[2::2])]


def print_nearest(tokenizer, found):
    for i, similarity in found:
        print(f"  {tokenizer.decode([i])!r:<20} {similarity:.3f}")


@torch.no_grad()
def show_neighbors(model, tokenizer, word, k):
    wte = token_embeddings(model)
    i = word_id(tokenizer, word)
    print(f"nearest tokens to {tokenizer.decode([i])!r} (cosine similarity of token embeddings):")
    print_nearest(tokenizer, nearest(wte, wte[i], k, exclude=[i]))


@torch.no_grad()
def show_analogy(model, tokenizer, expression, k):
    wte = token_embeddings(model)
    terms = [(sign, word_id(tokenizer, word)) for sign, word in parse_sum(expression)]
    vector = sum(sign * wte[i] for sign, i in terms)
    print(f"nearest tokens to {expression} (its words left out):")
    print_nearest(tokenizer, nearest(wte, vector, k, exclude=[i for _, i in terms]))


def pca_2d(x):
    """(n, C) -> (n, 2) coordinates along the two directions of largest variance, and their share of it."""
    x = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:2].T, (s[:2] ** 2 / (s ** 2).sum()).tolist()


@torch.no_grad()
def show_words(model, tokenizer, words, out):
    if len(words) < 3:
        raise UserError("--words needs at least 3 words to place on a plane")
    ids = [word_id(tokenizer, w) for w in words]
    xy, share = pca_2d(token_embeddings(model)[ids])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*xy.T.numpy())
    for (x, y), i in zip(xy.tolist(), ids):
        ax.annotate(tokenizer.decode([i]), (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"first principal component ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"second ({share[1]:.0%})")
    ax.set_title("token embeddings projected onto a plane (PCA)")
    fig.tight_layout()
    path = save_figure(fig, os.path.join(out, "words.png"), bbox_inches="tight")
    print(f"{len(ids)} token embeddings on their first two principal components "
          f"({share[0]:.0%} + {share[1]:.0%} of the variance): {path}")


# -----------------------------------------------------------------------------
# Predictions: the probability of each next token, and how surprised the model is by the real one.


@torch.no_grad()
def next_token_probabilities(model, ids):
    """Token ids (T,) -> (T, 50257): row t is the model's distribution over token t + 1 (over GPT-2's tokens:
    a padded vocabulary's extra ids are never predicted)."""
    logits, _ = model(torch.tensor([ids]))
    return F.softmax(logits[0, :, :GPTConfig.vocab_size], dim=-1)


def show_next(model, tokenizer, text, k, out):
    ids = encode_text(tokenizer, model, text, "--next")
    probs = next_token_probabilities(model, ids)
    # nats; the loss is its mean
    surprisal = [-math.log(probs[t, ids[t + 1]].item()) for t in range(len(ids) - 1)]
    loss = sum(surprisal) / len(surprisal)
    print(f"{'token':>16}  {'next':<16} {'p(next)':>9} {'-ln p':>6}   top {k} predictions")
    for t, i in enumerate(ids):
        top = probs[t].topk(k)
        guesses = ", ".join(f"{tokenizer.decode([j])!r} {p:.4g}"
                            for p, j in zip(top.values.tolist(), top.indices.tolist()))
        actual = (f"{tokenizer.decode([ids[t + 1]])!r:<16} {probs[t, ids[t + 1]].item():>9.4g} "
                  f"{surprisal[t]:>6.2f}"
                  if t + 1 < len(ids) else f"{'(end)':<16} {'':>9} {'':>6}")
        print(f"{tokenizer.decode([i])!r:>16}  {actual}   {guesses}")
    print(f"loss {loss:.3f} nats per token, perplexity {math.exp(loss):.1f} ({len(surprisal)} predictions)")

    labels = [label(tokenizer, i) for i in ids[1:]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.5 + 0.3 * len(labels)), 4))
    ax.bar(range(len(labels)), surprisal)
    ax.axhline(loss, color="black", linestyle="--", label=f"mean = loss {loss:.2f}")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_ylabel("surprisal -ln p(token) (nats)")
    ax.set_title(f"how unexpected each token was: perplexity {math.exp(loss):.1f}")
    ax.legend()
    fig.tight_layout()
    print(f"surprisal per token: {save_figure(fig, os.path.join(out, 'next.png'), bbox_inches='tight')}")


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="124M",
                        help="124M, 355M, 774M, 1558M (or gpt2, gpt2-medium, ...), a folder or a .pt")
    parser.add_argument("--out-dir", default="out/explore", help="where the pictures go")
    add_renamed(parser, "--out", "--out-dir")
    parser.add_argument("--weights", action="store_true",
                        help="every tensor, its OpenAI name, shape and size; the four sizes")
    parser.add_argument("--attention", metavar="TEXT",
                        help="heatmaps of the attention weights over this text")
    parser.add_argument("--layer", type=number(int, 0), default=0,
                        help="the layer --attention draws (0 = first)")
    parser.add_argument("--head", type=number(int, 0), default=0, help="the head --attention draws alone")
    parser.add_argument("--neighbors", metavar="WORD",
                        help="the tokens whose embeddings are closest to this word's")
    parser.add_argument("--analogy", metavar="'A - B + C'",
                        help="embedding arithmetic: the tokens closest to the sum")
    parser.add_argument("--words", nargs="+", metavar="WORD",
                        help="draw these words' embeddings on a plane (PCA; 3 words or more)")
    parser.add_argument("--next", metavar="TEXT",
                        help="the next-token predictions at each position, the loss and surprisal")
    parser.add_argument("--top-k", type=number(int, 1), default=5,
                        help="tokens shown per prediction or per search")
    args = parser.parse_args()
    views_of_the_model = [args.attention, args.neighbors, args.analogy, args.words, args.next]
    if not args.weights and all(view is None for view in views_of_the_model):
        parser.error("choose at least one view: --weights, --attention, --neighbors, --analogy, "
                     "--words or --next")

    if args.top_k > GPTConfig.vocab_size:
        raise UserError(f"--top-k {args.top_k:,} is more than the {GPTConfig.vocab_size:,} tokens of "
                        "GPT-2's vocabulary")
    if args.weights:
        show_weights(args.model)
    if all(view is None for view in views_of_the_model):
        return  # --weights alone reads an OpenAI folder's index, not its weights
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    if args.attention is not None:
        show_attention(model, tokenizer, args.attention, args.layer, args.head, args.out_dir)
    if args.neighbors is not None:
        show_neighbors(model, tokenizer, args.neighbors, args.top_k)
    if args.analogy is not None:
        show_analogy(model, tokenizer, args.analogy, args.top_k)
    if args.words is not None:
        show_words(model, tokenizer, args.words, args.out_dir)
    if args.next is not None:
        show_next(model, tokenizer, args.next, args.top_k, args.out_dir)


if __name__ == "__main__":
    run(main)
