"""What every script around gpt2.py needs: --help, checked flags, one-line errors, a device,
atomic files, downloads that resume, loading a model and its tokenizer, the Alpaca prompt, and
plots. gpt2.py needs none of it."""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from glob import glob

import tiktoken
import torch

from gpt2 import MODELS_DIR, GPT, GPTConfig, Tokenizer, load_weights, size_name


class UserError(Exception):
    """Bad input a user can fix: printed as one line, without a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default, and the script's docstring with its example commands as written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A mistyped or out-of-range flag: one line (not the whole usage) and exit code 2."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def argument_parser(doc):
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def number(kind, low, high=math.inf):
    """An argparse type: an int or float (kind) in [low, high], checked before any work starts."""
    what = "an integer" if kind is int else "a number"
    allowed = f"{what} >= {low}" if high == math.inf else f"{what} from {low} to {high}"

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):  # nan and inf fail too
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text}")
        return value
    return check


def add_overwrite_arg(parser, what):
    parser.add_argument("--overwrite", action="store_true", help=f"start a new run even where {what} already holds one")


def check_out_files(paths, overwrite, resume_hint=""):
    """Before any work: refuse to replace an earlier run's files unless --overwrite, make sure
    their folder can be written, and clear temporary files a killed run left behind."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} is from an earlier run and would be replaced: {resume_hint}pass --overwrite "
                        "to start over, or another output path")
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        created = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}.tmp")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror}): choose another output path") from None
        if created:
            os.rmdir(folder)  # made again with the first file saved: a failed run leaves no empty folder
    for p in paths:
        if os.path.exists(p + ".tmp"):
            os.remove(p + ".tmp")  # half a file from a run that was killed while saving


def add_model_args(parser, init_from):
    """--init-from and the size flags init_model takes, the same in every script that trains."""
    parser.add_argument("--init-from", default=init_from, help="scratch, a GPT-2 size (gpt2, gpt2-medium, 124M, ...: "
                        "see download_weights.py), a model folder (OpenAI's or Hugging Face's) or a .pt checkpoint")
    for flag, what in (("--n-layer", "number of blocks"), ("--n-head", "attention heads"), ("--n-embd", "width")):
        parser.add_argument(flag, type=number(int, 1), help=f"with --init-from scratch: {what}; None: 124M's")


def check_size_args(args):
    """The size flags fit together (heads split the width): checked before any work."""
    n_head, n_embd = args.n_head or GPTConfig.n_head, args.n_embd or GPTConfig.n_embd
    if args.init_from == "scratch" and n_embd % n_head:
        raise UserError(f"--n-embd {n_embd} must be a multiple of --n-head {n_head} (the heads split the width)")


def add_device_arg(parser):
    parser.add_argument("--device", default="auto", help="auto: cuda, else mps, else cpu; or a torch device (cpu, cuda:1, ...)")


def run(main):
    """Run a script's main(); bad input, a missing or unwritable file end it with one line on
    stderr and exit code 1."""
    try:
        main()
    except (UserError, ValueError, OSError) as e:  # OSError: missing files, full disks, read-only folders
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name="auto"):
    """'auto' -> cuda if present, else mps (Apple), else cpu; a device named but absent is an error."""
    if name != "auto":
        try:
            kind = torch.device(name).type
        except RuntimeError:
            raise UserError(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from None
        if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: this machine has no {kind.upper()} device that torch can use; "
                            "use --device cpu (or auto)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    """JSON to a temporary name, then rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def model_path(spec):
    """What --model names: an existing file or folder as it is; a size name (gpt2, 124M, ...) as models/<size>/."""
    if os.path.exists(spec):
        return spec
    try:
        return os.path.join(MODELS_DIR, size_name(spec))
    except ValueError:
        raise UserError(f"{spec} not found: pass a size name, a model folder (OpenAI's or Hugging Face's) "
                        "or a .pt checkpoint") from None


def load_model(spec):
    """A size name, a model folder (OpenAI's or Hugging Face's) or a .pt of ours -> GPT in eval mode."""
    model_path(spec)  # a clear line for a path that is not there
    with quiet_stderr():  # TensorFlow, reading OpenAI's files, logs its start-up: not for our users
        return GPT.from_pretrained(spec)


@contextlib.contextmanager
def quiet_stderr():
    """Silence what C++ libraries write to file descriptor 2 (TensorFlow logs there before any setting applies)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# OpenAI's tokenizer files: the same encoding as tiktoken's, built from the
# encoder.json that OpenAI ships beside the weights (no download needed).

# GPT-2's pre-tokenizer: text is cut into words, numbers, punctuation runs and spaces before BPE
# (OpenAI's encoder.py pattern, in the equivalent possessive form tiktoken uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def openai_tokenizer(folder):
    """A Tokenizer from folder/encoder.json (token -> id)."""
    path = os.path.join(folder, "encoder.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: GPT-2's tokenizer is read from a model folder's encoder.json")
    with open(path, encoding="utf-8") as f:
        encoder = json.load(f)
    # encoder.json spells each byte as a printable character: bytes '!'..'~', '¡'..'¬' and '®'..'ÿ'
    # as themselves, the other 68 (space, control bytes, ...) as chr(256), chr(257), ... in byte order.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    byte_of = {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}
    # OpenAI numbered the 256 bytes first, then each merge in the order it was learned (vocab.bpe's
    # lines), so a token's id is also its merge rank: lower merges first, which is all BPE needs.
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]})
    return Tokenizer(enc)


def load_tokenizer(spec=None):
    """GPT-2's tokenizer: from a model folder's encoder.json when spec names one (works offline),
    else tiktoken's (downloaded once, then cached), else any downloaded model's encoder.json."""
    try:
        folder = model_path(spec) if spec else None
    except UserError:  # "scratch", or a file that is not there: tiktoken's then
        folder = None
    if folder and os.path.isfile(os.path.join(folder, "encoder.json")):
        return openai_tokenizer(folder)
    try:
        return Tokenizer()
    except OSError as e:  # requests' errors are OSErrors: offline, with nothing in tiktoken's cache
        local = sorted(glob(os.path.join(MODELS_DIR, "*", "encoder.json")))
        if local:
            return openai_tokenizer(os.path.dirname(local[0]))
        raise UserError(f"GPT-2's tokenizer files could not be downloaded ({type(e).__name__}): connect to the "
                        "internet once (tiktoken then caches them), set TIKTOKEN_CACHE_DIR to a folder holding "
                        "tiktoken's cache, or put a model folder with encoder.json in models/ "
                        "(python download_weights.py)") from None


def init_model(init_from, context_length=None, dropout=None, **size):
    """'scratch' -> a new GPT-2 124M with any of size's n_layer / n_head / n_embd overrides;
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
    if changes.get("n_ctx", 0) > model.config.n_ctx:
        raise UserError(f"--context-length {changes['n_ctx']} is longer than the model's {model.config.n_ctx}")
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: changes.get("n_ctx", model.config.n_ctx)]
    return load_weights(GPT.empty(replace(model.config, **changes)), state, init_from)


def train_layout(model):
    """Every weight contiguous, as nn.Linear makes it: training computes the gradients (out, in), and a loaded
    model's (in, out) matrices would cost a transposing copy at every step (bench.py's training rows)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.is_contiguous():
            module.weight = torch.nn.Parameter(module.weight.detach().contiguous(), module.weight.requires_grad)
    return model


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters, decaying only matrices (not biases or layer norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def learning_rate(step, total, args):
    """Linear warmup to args.lr over args.warmup_iters steps, then a cosine decay that reaches
    args.min_lr at the last of the total steps; args.lr throughout when min_lr is None and no warmup."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    min_lr = args.lr if args.min_lr is None else args.min_lr
    progress = (step - args.warmup_iters) / max(1, total - 1 - args.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


# -----------------------------------------------------------------------------
# The Alpaca prompt: what an instruction-tuned model reads before it answers.


def format_prompt(entry):
    """The Alpaca prompt for {"instruction", "input" (may be empty or absent)}. Training
    (finetune_instruct.py), answering, judging and sample.py --instruction all use this."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


# -----------------------------------------------------------------------------
# Downloads: resume a partial file, retry, check the size, rename only when whole.

RETRY_WAIT = 1.0  # seconds before the first retry, doubled before each next one


def download(url, dest, size=None, retries=3, timeout=30):
    """Fetch url into dest through dest + '.part', in up to `retries` tries; each resumes what
    the last one left in the .part with an HTTP Range request. The file must have `size` bytes
    when given, else as many as the server announces; only then is it renamed to dest."""
    import requests

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, dest + ".part", size, timeout)
            break
        except requests.HTTPError as e:
            status = e.response.status_code
            if status < 500:  # 404 and its kind: asking again will not help
                raise UserError(f"{url} answered HTTP {status} {e.response.reason}: no such file there; "
                                "check the address") from None
            problem = f"HTTP {status}"
        except requests.ConnectionError:
            problem = "cannot connect"
        except requests.Timeout:
            problem = f"no answer in {timeout} s"
        except (requests.RequestException, OSError) as e:
            problem = str(e)[:120]
        if attempt == retries:
            raise UserError(f"could not download {url} ({problem}); check your connection and run again "
                            f"(it resumes), or put the file at {dest} yourself")
        wait = RETRY_WAIT * 2 ** (attempt - 1)
        print(f"download failed ({problem}); retry {attempt}/{retries - 1} in {wait:g} s", file=sys.stderr)
        time.sleep(wait)
    os.replace(dest + ".part", dest)
    return dest


def _download_once(url, part, size, timeout):
    """One try of download(): append to part what it lacks; raise unless it is then whole."""
    import requests
    from tqdm import tqdm

    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have >= size:
        if have == size:  # whole already: an earlier run stopped just before the rename
            return
        os.remove(part)  # longer than the real file: start over
        have = 0
    # identity: with a compressed response, Content-Length and Range would count other bytes than the file's
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # the .part is no shorter than the file: nothing to resume from
            os.remove(part)
            raise OSError("the partial file could not be resumed; starting over")
        r.raise_for_status()
        if r.status_code == 206:  # "Content-Range: bytes <have>-<last>/<total>"
            total = r.headers.get("content-range", "").rpartition("/")[2]
        else:  # the whole file (no Range asked, or the server ignored it)
            have, total = 0, r.headers.get("content-length", "")
        total = int(total) if total.isdigit() else size
        if size is not None and total != size:
            raise UserError(f"{url} has {total:,} bytes, but the published size is {size:,}: not saved")
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(url)
        ) as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses < 64 KiB
                f.write(chunk)
                bar.update(len(chunk))
    got = os.path.getsize(part)
    if total is not None and got != total:
        if got > total:
            os.remove(part)
        raise OSError(f"got {got:,} bytes, expected {total:,}")


def ensure_file(path, url):
    """path if it exists, else download it from url; offline, the error says where to put it."""
    if not os.path.isfile(path):
        print(f"{path} not found: downloading {url}", file=sys.stderr)
        download(url, path)
    return path


# -----------------------------------------------------------------------------
# Plots: one PNG, one panel per quantity, every curve labelled.


def plot_curves(path, xlabel, panels):
    """panels: {ylabel: {curve label: (xs, ys)}} -> a PNG with the panels side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, marker="o", markersize=3)  # markers: a single point shows too
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
