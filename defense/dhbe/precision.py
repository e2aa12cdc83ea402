"""Lower precision for the game (opt-in, `precision=bf16`; docs/performance.md): autocast for the
networks, the logits and Eq. 8 in fp32, and the searches in fp32."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class _LogitsInFP32:
    """Mixed into the class of a model's last linear layer (the logits): under autocast it runs in
    fp32, so Eq. 8's L1 between T's and S's logits is taken on fp32 values. Outside autocast it
    changes nothing; the layer's state_dict is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def keep_logits_fp32(model: nn.Module) -> nn.Module:
    """Swap the class of `model`'s last nn.Linear for one that computes in fp32 under autocast."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if heads and not isinstance(heads[-1], _LogitsInFP32):
        cls = type(heads[-1])
        heads[-1].__class__ = type(f"FP32Logits{cls.__name__}", (_LogitsInFP32, cls), {})
    return model


def game_precision(precision: str, device: torch.device):
    """The autocast context of the game's forward passes (bf16), or none (fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def searches_in_fp32(precision: str, device: torch.device):
    """Autocast off for the warm-up and the trigger refreshes: under bf16 a data-free search flagged
    no class on a backdoored model the fp32 search flags (docs/performance.md)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
