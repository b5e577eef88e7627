"""The device, its number format and its memory: what fits is refused before it is allocated."""

import contextlib
import ctypes
import platform
import subprocess

import torch

from errors import UserError


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
    """--dtype on this device -> the autocast context for forward passes, checked before any work. float32
    leaves every op as it is; the others autocast the matrix products."""
    device_type = torch.device(device).type
    if dtype == "float32":
        if note and device_type == "cpu" and native_bf16("cpu"):
            # (no figure: the gain depends on the CPU, 1.7x to 2.2x in bench.py's training step here)
            print("note: this CPU computes bfloat16 natively: --dtype bfloat16 trains faster "
                  "(python bench.py measures by how much on this machine)")
        return contextlib.nullcontext()
    if dtype == "float16" and device_type == "cpu":
        raise UserError("--dtype float16 is for GPUs: on a CPU use --dtype bfloat16 (where it computes it "
                        "natively) or float32")
    if dtype == "bfloat16" and not native_bf16(device_type):
        raise UserError(f"--dtype bfloat16: this {device_type.upper()} does not compute bfloat16 natively "
                        "(no AMX, AVX-512 BF16 or Arm BF16), so it would run several times slower: use "
                        "--dtype float32")
    return torch.autocast(device_type, dtype=DTYPES[dtype])


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
