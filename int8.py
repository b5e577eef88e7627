"""int8 weights for generation on a CPU: every matrix of gpt2.py's model, the output head included, kept as
int8 with one scale per output row; the activations are quantized on the fly at each product (PyTorch's
dynamic quantization). Batch-1 generation reads each weight once per token, so a quarter of the bytes is
most of the speed-up; the token embedding stays float32 (it is looked up, not multiplied).

    from int8 import quantize
    model = quantize(GPT.from_pretrained("124M"))      # or: python sample.py --int8 ...
"""

import copy
import warnings

import torch
from torch import nn


def quantize(model):
    """A copy of model (eval, on the CPU) whose linear layers keep int8 weights; model is left as it was."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    q = copy.deepcopy(model).cpu().float().eval()
    for m in q.modules():
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear  # torch's quantization knows nn.Linear by its exact type, not gpt2.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is marked for migration to torchao
        return quantize_dynamic(q, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
