"""LoRA (Hu et al., 2021): freeze the pretrained weights and learn a low-rank change to each linear layer
of the blocks, a fraction of the parameters; merged back, the model is a plain GPT again."""

import math

import torch
import torch.nn as nn

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer inside the blocks


class LoRALinear(nn.Module):
    """linear(x) + x A^T B^T * alpha / rank, with only A (rank, in) and B (out, rank) trained.
    B starts at zero, so training starts exactly from the pretrained model."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank

    def forward(self, x):
        return self.linear(x) + (x @ self.A.T @ self.B.T) * self.scale

    @torch.no_grad()
    def merge(self):
        """The plain linear layer with the low-rank change folded into its weight."""
        self.linear.weight += (self.B @ self.A) * self.scale
        return self.linear


def add_lora(model, rank, alpha):
    """Freeze every weight, then wrap the blocks' linear layers in LoRALinear."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged linear layer: a plain GPT again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    return model
