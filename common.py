"""What the scripts around gpt2.py share: checked flags and one-line errors, files written whole, the
device and its number format, loading a model and its tokenizer, the one training loop, downloads that
resume, plots and the Alpaca prompt. gpt2.py needs none of it."""

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from glob import escape, glob

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import GPT, MODELS_DIR, GPTConfig, Tokenizer, load_weights, size_name

# -----------------------------------------------------------------------------
# Flags and errors: every flag checked before any work; bad input is one line, exit 1.


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


class Renamed(argparse.Action):
    """A flag's old name: one line that gives the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.const}")


def add_renamed(parser, old, new):
    parser.add_argument(old, action=Renamed, const=new, nargs="?", help=argparse.SUPPRESS)


def add_overwrite_arg(parser, what):
    parser.add_argument("--overwrite", action="store_true",
                        help=f"start a new run even where {what} already holds one")


def add_device_arg(parser):
    parser.add_argument("--device", default="auto",
                        help="auto: cuda, else mps, else cpu; or a torch device (cpu, cuda:1, ...)")


def add_model_args(parser, init_from, dropout=None):
    """--init-from, the size flags init_model takes and --dropout: the same in every script that trains."""
    parser.add_argument("--init-from", default=init_from,
                        help="scratch, a GPT-2 size (gpt2, gpt2-medium, 124M, ...: see download_weights.py), "
                        "a model folder (OpenAI's or Hugging Face's) or a .pt checkpoint")
    for flag, what in (("--n-layer", "number of blocks"), ("--n-head", "attention heads"),
                       ("--n-embd", "width")):
        parser.add_argument(flag, type=number(int, 1), help=f"with --init-from scratch: {what}; None: 124M's")
    parser.add_argument("--dropout", type=number(float, 0, 1), default=dropout,
                        help="dropout rate while training; None: the model's own (0 for OpenAI's)")


def check_size_args(args):
    """The size flags fit together (heads split the width) and the new model fits in memory: checked before
    any work."""
    if args.init_from != "scratch":
        return
    n_head, n_embd = args.n_head or GPTConfig.n_head, args.n_embd or GPTConfig.n_embd
    if n_embd % n_head:
        raise UserError(f"--n-embd {n_embd} must be a multiple of --n-head {n_head} (the heads "
                        "split the width)")
    config = GPTConfig(n_layer=args.n_layer or GPTConfig.n_layer, n_head=n_head, n_embd=n_embd,
                       n_ctx=args.context_length or GPTConfig.n_ctx)
    check_memory(4 * parameter_count(config), "cpu", "the new model's weights",
                 "--n-layer, --n-embd or --context-length")


def parameter_count(c):
    """The parameters of a GPT of config c: per block two matrices (E, 3E), (E, E) and two (E, 4E) with their
    biases and two layer norms, then the embeddings and the last layer norm (the head shares wte)."""
    return c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd) + (c.vocab_size + c.n_ctx + 2) * c.n_embd


def free_memory(device):
    """Bytes device can still give: a GPU's free memory, the RAM the kernel can give without swapping
    (Linux's MemAvailable); None where unknown (then nothing is checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(need, device, what, lower):
    """Refuse, in one line and before allocating it, work that needs more than device can hold (where a
    kernel would kill the process without a word, or an allocator fail deep inside torch)."""
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"{what} need about {need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB "
                        f"free on {device}: lower {lower}")


def check_training_memory(model, batch_tokens, dtype, device):
    """A lower bound of what one step needs beyond the weights: gradients and AdamW's two moments for the
    trainable parameters, and per token of a micro-batch the logits with their gradient (float32) and at
    least 16 activations of n_embd per block (124M in float32 keeps 1.5 MB a token, measured; this says
    1.0)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c, size = model.config, torch.finfo(DTYPES[dtype]).bits // 8
    per_token = 8 * model.lm_head.out_features + 16 * c.n_layer * c.n_embd * size
    check_memory(12 * trainable + batch_tokens * per_token, device,
                 f"training steps of {batch_tokens:,} tokens",
                 "--batch-size (--grad-accum keeps the batch), --context-length or the model")


def out_of_memory(e):
    return (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
            or "not enough memory" in str(e))


def run(main):
    """Run a script's main(): bad input, a missing or unwritable file, memory that runs out end it with one
    line on stderr and exit code 1; Ctrl-C or SIGTERM with exit code 130. GPT2_DEBUG=1 shows the traceback."""
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))  # a kill is a Ctrl-C: the same clean stop
    try:
        main()
    except (UserError, ValueError, OSError, RuntimeError) as e:  # OSError: missing files, full disks, ...
        if os.environ.get("GPT2_DEBUG") or isinstance(e, RuntimeError) and not out_of_memory(e):
            raise
        hint = "; use a smaller --batch-size, --context-length or model" if out_of_memory(e) else ""
        print(f"error: {' '.join(str(e).split())[:500]}{hint}", file=sys.stderr)  # one line, whatever e holds
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("GPT2_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Files written whole: to a temporary name first, renamed when complete.


@contextlib.contextmanager
def replaced(path):
    """Yields a temporary name beside path; once the block has written it whole, it becomes path. An error
    or a kill midway leaves path as it was (and the next check_out_files clears the temporary file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path):
    with replaced(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj, path):
    with replaced(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def check_out_files(paths, overwrite, resume_hint=""):
    """Before any work: refuse to replace an earlier run's files unless --overwrite, make sure
    their folder can be written, and clear temporary files a killed run left behind."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} is from an earlier run and would be replaced: {resume_hint}pass "
                        "--overwrite to start over, or another output path")
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
    for stale in (s for p in paths for s in glob(escape(p) + ".*.tmp")):
        os.remove(stale)  # half a file from a run that was killed while saving


def read_checkpoint(path, what, missing, needs=("config", "model"), mmap=False):
    """A .pt the scripts wrote -> its dict (weights only: never runs code); else one line saying so.
    mmap: read each tensor from the file only when used (for a look at a few of its values)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        assert isinstance(ckpt, dict) and set(needs) <= set(ckpt)
    except Exception:
        raise UserError(f"{path} is not {what} of this project") from None
    return ckpt


# -----------------------------------------------------------------------------
# The device and its number format.


def pick_device(name="auto"):
    """'auto' -> cuda if present, else mps (Apple), else cpu; a device named but absent is an error."""
    if name != "auto":
        try:
            kind = torch.device(name).type
        except RuntimeError:
            raise UserError(f"--device {name}: not a torch device (auto, cpu, cuda, "
                            "cuda:1, mps, ...)") from None
        if (kind == "cuda" and not torch.cuda.is_available()
                or kind == "mps" and not torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: this machine has no {kind.upper()} device that torch can use; "
                            "use --device cpu (or auto)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bench.py's training step of GPT-2 124M, bfloat16 over float32 (both with fused AdamW), on a 2-core Xeon
# with AMX; the book's whole run, evaluations and samples included, 1.8x
BF16_SPEEDUP = "2.2x"


def native_bf16(device_type):
    """Whether the device computes bfloat16 in hardware: AMX or AVX-512 BF16 on x86, the BF16
    extension on Arm (elsewhere torch emulates it, several times slower than float32), or a GPU."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return device_type == "mps"
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    try:  # Arm: Linux lists the feature in /proc/cpuinfo, macOS in sysctl
        with open("/proc/cpuinfo") as f:
            return " bf16" in f.read()
    except OSError:
        check = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return check.stdout.strip() == "1"


def precision(dtype, device, note=True):
    """--dtype on this device -> (autocast context for forward passes, GradScaler for float16 or None),
    checked before any work. float32 leaves every op as it is; the others autocast the matrix products."""
    device_type = torch.device(device).type
    if dtype == "float32":
        if note and device_type == "cpu" and native_bf16("cpu"):
            print(f"note: this CPU computes bfloat16 natively: --dtype bfloat16 makes training steps about "
                  f"{BF16_SPEEDUP} faster (bench.py)")
        return contextlib.nullcontext(), None
    if dtype == "float16" and device_type == "cpu":
        raise UserError("--dtype float16 is for GPUs: on a CPU use --dtype bfloat16 (where it computes it "
                        "natively) or float32")
    if dtype == "bfloat16" and not native_bf16(device_type):
        raise UserError(f"--dtype bfloat16: this {device_type.upper()} does not compute bfloat16 natively "
                        "(no AMX, AVX-512 BF16 or Arm BF16), so it would run several times slower: use "
                        "--dtype float32")
    scaler = torch.amp.GradScaler(device_type) if dtype == "float16" else None  # float16's small gradients
    return torch.autocast(device_type, dtype=DTYPES[dtype]), scaler


# -----------------------------------------------------------------------------
# Models and their tokenizer.


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
    """A model folder in a format gpt2.py does not read: one line saying how to make one it reads."""
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, name))
                                      for name in ("model.safetensors", "hparams.json")):
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
    except ValueError as e:
        if "is a classifier" not in str(e):
            raise
        raise UserError(f"{e}: it tells spam from ham, with  python finetune_spam.py --classify TEXT "
                        f"--out-dir {os.path.dirname(spec) or '.'}") from None
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
# ships beside the weights (no download needed). It would take gpt2.py past its 400 lines.

# GPT-2's pre-tokenizer: text is cut into words, numbers, punctuation runs and spaces before BPE
# (OpenAI's encoder.py pattern, in the equivalent possessive form tiktoken uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def openai_tokenizer(folder):
    """A Tokenizer from folder/encoder.json (token -> id)."""
    path = os.path.join(folder, "encoder.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: GPT-2's tokenizer is read from a model folder's "
                                "encoder.json")
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
        raise UserError(f"GPT-2's tokenizer files could not be downloaded ({type(e).__name__}): connect to "
                        "the internet once (tiktoken then caches them), set TIKTOKEN_CACHE_DIR to a folder "
                        "holding tiktoken's cache, or put a model folder with encoder.json in models/ "
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
        raise UserError(f"--context-length {changes['n_ctx']} is longer than the model's "
                        f"{model.config.n_ctx}")
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: changes.get("n_ctx",
                                                                                    model.config.n_ctx)]
    return load_weights(GPT.empty(replace(model.config, **changes)), state, init_from)


def train_layout(model):
    """Every weight contiguous, as nn.Linear makes it: training computes the gradients (out, in), and a loaded
    model's (in, out) matrices would cost a transposing copy at every step (bench.py's training rows)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.is_contiguous():
            module.weight = torch.nn.Parameter(module.weight.detach().contiguous(),
                                               module.weight.requires_grad)
    return model


# -----------------------------------------------------------------------------
# The training loop of train.py, finetune_spam.py and finetune_instruct.py: each gives its batches,
# its loss and its evaluation; the loop gives them the same flags, progress, Ctrl-C and --resume.


def add_training_args(parser, **defaults):
    """The flags every training script shares, with one name and one meaning; defaults: the script's own."""
    add = parser.add_argument
    add("--out-dir", default="out",
        help="where ckpt.pt (everything --resume needs), the best model and loss.png go")
    add_overwrite_arg(parser, "--out-dir")
    add("--resume", action="store_true",
        help="continue OUT_DIR/ckpt.pt with its settings: flags given now override them, except those that "
        "fix the model, the data and the batches")
    add("--max-iters", type=number(int, 0), default=0,
        help="optimizer steps; 0: --epochs passes over the data")
    add("--epochs", type=number(int, 1), default=1, help="passes over the training data")
    add("--batch-size", type=number(int, 1), default=8,
        help="examples per optimizer step, over all processes")
    add("--grad-accum", type=number(int, 1), default=1,
        help="micro-batches per step and process: the same steps, in less memory")
    add("--context-length", type=number(int, 1),
        help="tokens per sequence: the model's window is cut to it (a pretrained model keeps its first "
        "positions); None: the model's own")
    add("--lr", type=number(float, 0), default=4e-4, help="peak learning rate")
    add("--min-lr", type=number(float, 0),
        help="learning rate at the end of a cosine decay over all the steps; None: --lr throughout "
        "(constant, as in the book)")
    add("--warmup-iters", type=number(int, 0), default=0, help="steps of linear warmup to --lr")
    add("--weight-decay", type=number(float, 0), default=0.1, help="AdamW's, on weight matrices only")
    add("--beta2", type=number(float, 0, 0.99999), default=0.999, help="AdamW's second-moment decay")
    add("--grad-clip", type=number(float, 0), default=0.0,
        help="clip the gradient norm to this; 0: no clipping")
    add("--eval-interval", type=number(int, 0), default=0,
        help="steps between evaluations; 0: once per epoch")
    add("--eval-batches", type=number(int, 0), default=5, help="batches of each split per evaluation; 0: all")
    add_device_arg(parser)
    add("--dtype", choices=list(DTYPES), default="float32", help="number format of training and evaluation: "
        "bfloat16 where the CPU (AMX, AVX-512 BF16, Arm BF16) or GPU computes it; float16 on GPUs")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=123, help="for the initial weights, the order of the data and dropout")
    for old, new in (("--out", "--out-dir"), ("--max-steps", "--max-iters"),
                     ("--max-length", "--context-length")):
        add_renamed(parser, old, new)
    parser.set_defaults(**defaults)


def resume_args(parser, ckpt, fixed):
    """The checkpoint's settings, overridden by the flags given now, except fixed (the flags that fix
    the model, the data and which examples each step trains on): those are an error if they differ."""
    resumed = parser.parse_args(namespace=argparse.Namespace(**ckpt["args"]))  # fills in only what it lacks
    changed = [k for k in fixed if getattr(resumed, k) != ckpt["args"].get(k)]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} {getattr(resumed, changed[0])} differs from the checkpoint's "
                        f"{ckpt['args'].get(changed[0])}, and it cannot change on --resume: drop {flag}, or "
                        "start a new run in another --out-dir")
    return resumed


def start_run(parser, args, out_dir, out_files, fixed):
    """Before any work: with --resume, out_dir/ckpt.pt and the settings it continues with; else out_dir
    must not hold an earlier run's files (unless --overwrite) -> (args, the checkpoint or None)."""
    paths = [os.path.join(out_dir, name) for name in ("ckpt.pt", *out_files)]
    if not args.resume:
        check_out_files(paths, args.overwrite, "--resume continues it, ")
        return args, None
    check_out_files(paths, overwrite=True)
    ckpt = read_checkpoint(paths[0], "a checkpoint that --resume can continue",
                           "nothing to resume (drop --resume to start a new run)",
                           needs=("config", "model", "optimizer", "step", "tokens", "history", "args"))
    return resume_args(parser, ckpt, fixed), ckpt


SAVE_EVERY = 600  # seconds: ckpt.pt is saved at an evaluation that comes later than this after the last save
# (and at the end, at Ctrl-C and at SIGTERM). 124M's ckpt.pt is 1.5 GB, 3.6 s to write on a laptop's disk:
# saved at each of the book's run's evaluations it took a fifth of the run.


def keep_freed_memory():
    """glibc gives every large block back to the system when it is freed, so each training step page-faults
    its big tensors (the 154 MB embedding gradient, the logits) in afresh: a fifth of a CPU step. Keep them:
    large blocks come from the heap, which is never trimmed. (Linux with glibc; elsewhere nothing changes.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), fused=True):
    """AdamW over the trainable parameters, decaying only matrices (not biases or layer norms); fused
    (one kernel for all parameters: 1.2x faster training on a CPU, bench.py) where torch has it for the
    device. fused=False: torch's default, one kernel per operation over all parameters (foreach)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def learning_rate(step, total, args):
    """Linear warmup to args.lr over args.warmup_iters steps, then a cosine decay that reaches
    args.min_lr at the last of the total steps; args.lr throughout when min_lr is None and no warmup."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    min_lr = args.lr if args.min_lr is None else args.min_lr
    progress = (step - args.warmup_iters) / max(1, total - 1 - args.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


@functools.lru_cache(maxsize=1)
def epoch_order(n, seed):
    """A shuffle of n items, drawn once per epoch: 8 bytes an item (80 MB for 10B tokens in windows of
    1024)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_items(n, step, batch_size, seed):
    """The batch_size items (of n) that optimizer step `step` trains on. Each epoch shuffles all n with a seed
    of its own, so a resumed run sees the same batches; an epoch's last partial batch is dropped, as the
    book's DataLoaders drop it."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(n, seed + epoch)[i * batch_size:(i + 1) * batch_size].tolist()


def train(args, model, optimizer, amp, total, steps_per_epoch, micro_batches, loss_of, evaluate, best,
          best_name="best.pt", ckpt=None, raw=None, world=1, rank=0, sample=None, patience=None):
    """Train model (as wrapped for DDP or torch.compile; raw: the model itself) for total steps. Every
    --eval-interval steps and at the end: evaluate() -> {"train": loss, "val": loss, ...}, printed (with
    sample() if given) and kept in the history; a lower "val" writes best() into OUT_DIR/best_name, and
    ckpt.pt is saved if SAVE_EVERY seconds have passed since it last was. A step: this process's
    micro_batches(step) (each a tuple, its input first), their loss_of(model, batch), AdamW. Ctrl-C saves
    after the step and stops; --resume (ckpt) goes on bitwise. patience: stop after that many evaluations
    without a lower "val". -> the progress: "step", "tokens", "best_val", "history" ({"step", "tokens",
    "train", "val", ...} per evaluation, "loss" per step), "stopped"."""
    raw, master = raw or model, rank == 0
    autocast, scaler = amp
    keep_freed_memory()
    torch.manual_seed(args.seed + rank)  # dropout masks: their own stream in each process
    progress = resume_progress(ckpt, optimizer, scaler, os.path.join(args.out_dir, best_name), world, rank)
    progress["saved"] = time.time()  # (not saved in ckpt.pt: see save_latest)
    history, eval_interval = progress["history"], args.eval_interval or steps_per_epoch
    if master:
        print(f"{total} steps of {args.batch_size} ({steps_per_epoch} per epoch), {world} process(es), "
              f"{args.dtype}, from step {progress['step']}")
    stop = StopRequest()
    bar = tqdm_bar(total, progress["step"], disable=not master)
    train_time, steps_timed, tokens_timed, interrupted, patience_out = 0.0, 0, 0, False, False
    while True:
        step = progress["step"]
        if (step % eval_interval == 0 or step == total) and history["step"][-1:] != [step]:
            patience_out = evaluate_and_save(args, model, raw, optimizer, scaler, progress, evaluate,
                                             autocast, best, best_name, step, total, steps_per_epoch, world,
                                             master, bar, sample, patience)
        if step == total or interrupted or patience_out:
            break
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, args)
        micro = micro_batches(step)
        loss_sum = train_step(model, optimizer, scaler, micro, loss_of, autocast, args.grad_clip)
        report = torch.tensor([loss_sum, float(stop.requested)], device=micro[0][0].device)
        if world > 1:
            dist.all_reduce(report)  # the mean loss, and whether any process got Ctrl-C
        loss, interrupted = report[0].item() / world, report[1].item() > 0
        tokens = sum(batch[0].numel() for batch in micro) * world
        history["loss"].append(loss)
        progress["step"], progress["tokens"] = step + 1, progress["tokens"] + tokens
        dt = time.time() - t0
        train_time, steps_timed, tokens_timed = train_time + dt, steps_timed + 1, tokens_timed + tokens
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}")
    bar.close()
    stop.restore()
    save_latest(raw, optimizer, scaler, progress, args, world, master)
    if master:
        plot_history(history, os.path.join(args.out_dir, "loss.png"))
        if steps_timed:
            print(f"{steps_timed} steps in {train_time:.0f} s, {tokens_timed / train_time:,.0f} tokens/s "
                  f"(evaluation excluded); {args.out_dir}/ckpt.pt and loss.png written")
        if interrupted:
            print(f"stopped at step {progress['step']}/{total}: {' '.join(resume_command(args))} continues")
    return {**progress, "stopped": interrupted}  # (and "saved", the time it was)


def resume_command(args):
    command = ["python", os.path.basename(sys.argv[0]), "--resume"]
    return command + (["--out-dir", args.out_dir] if args.out_dir != "out" else [])


def tqdm_bar(total, initial, disable):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=disable, dynamic_ncols=True)


def resume_progress(ckpt, optimizer, scaler, best_path, world, rank):
    """{"step", "tokens", "best_val", "history"}: a new run's, or those ckpt.pt saved, with the optimizer,
    the gradient scaler and every process's random state as they were."""
    if not ckpt:
        history = {"step": [], "tokens": [], "loss": []}  # "loss": every step's training loss
        return {"step": 0, "tokens": 0, "best_val": math.inf, "history": history}
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if "cuda" in ckpt["rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    elif rank == 0:
        print(f"note: {len(ckpt['rng'])} processes wrote the checkpoint, {world} resume it: dropout "
              "draws new masks")
    best_val = math.inf  # the best model file may be newer than ckpt.pt: never replace it by a worse one
    if os.path.isfile(best_path):
        best_val = read_checkpoint(best_path, "a model", "", needs=("val_loss",), mmap=True)["val_loss"]
    return {"step": ckpt["step"], "tokens": ckpt["tokens"], "best_val": min(ckpt["best_val"], best_val),
            "history": ckpt["history"]}


def evaluate_and_save(args, model, raw, optimizer, scaler, progress, evaluate, autocast, best, best_name,
                      step, total, steps_per_epoch, world, master, bar, sample, patience):
    """One evaluation: into the history and printed; best.pt if the validation loss fell; ckpt.pt
    between the first and the last step. -> whether patience ran out."""
    history = progress["history"]
    model.eval()
    with torch.no_grad(), autocast:
        metrics = evaluate()
        text = sample() if sample and master else None
    model.train()
    for key, value in {"step": step, "tokens": progress["tokens"], **metrics}.items():
        history.setdefault(key, []).append(value)
    if master:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.2%}" if "accuracy" in k else f"{k} loss {v:.3f}"
                          for k, v in metrics.items())
        bar.write(f"step {step} (epoch {step / steps_per_epoch:.1f}, {progress['tokens']:,} tokens): {shown}")
        if text is not None:
            bar.write(f"  {text}")
    if metrics["val"] < progress["best_val"]:  # the best model file only ever gets a better model
        progress["best_val"] = metrics["val"]
        if master:
            save_atomic({**best(), "step": step, "val_loss": metrics["val"]},
                        os.path.join(args.out_dir, best_name))
    if 0 < step < total and time.time() - progress["saved"] > SAVE_EVERY:
        save_latest(raw, optimizer, scaler, progress, args, world, master)
    vals = history["val"]
    if patience and len(vals) - 1 - vals.index(min(vals)) >= patience:
        if master:
            bar.write(f"no lower validation loss in {patience} evaluations: stopping")
        return True
    return False


def train_step(model, optimizer, scaler, micro, loss_of, autocast, grad_clip):
    """One update from this process's micro-batches -> the sum of their (scaled) losses."""
    loss_sum = 0.0
    for m, batch in enumerate(micro):
        # DDP averages gradients over processes in backward(); only the last micro-batch needs it.
        last = m == len(micro) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with autocast:
                loss = loss_of(model, batch) / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.item()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def rng_states(world):
    """Every process's random state (it draws the dropout masks), as tensors that
    torch.load(weights_only=True) reads back."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def save_latest(raw, optimizer, scaler, progress, args, world, master):
    """ckpt.pt: everything --resume needs. Every process takes part (their random states); rank 0 writes."""
    rng = rng_states(world)
    progress["saved"] = time.time()
    saved = {k: v for k, v in progress.items() if k != "saved"}
    if master:
        save_atomic(raw.checkpoint(optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict() if scaler else None, **saved, rng=rng,
                                   args=vars(args)), os.path.join(args.out_dir, "ckpt.pt"))


class StopRequest:
    """Ctrl-C or SIGTERM while training: finish the step, save, stop; never halfway through an update.
    A second Ctrl-C quits at once, unsaved."""

    def __init__(self):
        self.requested = False
        self.saved = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping: saving after this step (Ctrl-C again quits without saving)", file=sys.stderr)

    def restore(self):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def plot_history(history, path):
    """The losses (and accuracies, where a script measures them) of each evaluation, against tokens seen."""
    tokens = history["tokens"]
    panels = {"loss": {"train": (tokens, history["train"]), "validation": (tokens, history["val"])}}
    if "val_accuracy" in history:
        panels["accuracy"] = {"train": (tokens, history["train_accuracy"]),
                              "validation": (tokens, history["val_accuracy"])}
    return plot_curves(path, "tokens seen", panels)


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
# Plots: PNG files only, no window; one panel per quantity, every curve labelled.


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **savefig):
    """fig as the PNG path, written whole."""
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    pyplot().close(fig)
    return path


def plot_curves(path, xlabel, panels):
    """panels: {ylabel: {curve label: (xs, ys)}} -> a PNG with the panels side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, marker="o", markersize=3)  # markers: a single point shows too
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
