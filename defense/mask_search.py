"""Data-free targeted trigger inversion, mask and pattern (a departure from DHBE; docs/dhbe.md,
ninth round).

Neural Cleanse (Wang et al., S&P 2019) reverse-engineers, for a class k, the smallest trigger that
sends clean inputs to k: x' = (1 - m) x + m p with a mask m in [0, 1] (one value per pixel) and a
pattern p in [0, 1], minimising CE(model(x'), k) + cost * |m|_1, the cost raised while the trigger
works on at least `success` of the batch and lowered while it does not. Here the clean inputs are
the sample generator's images and k a class the verdict already suspects, so one inversion per
suspect is enough; the form covers a patch of any size at any place (a small mask) and a blend
(a wide faint one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from defense.models import frozen


@dataclass
class MaskTrigger:
    """An inverted trigger: mask (1, H, W) and pattern (C, H, W), both in [0, 1], with the share of
    the last batch it sent to its class and its mask's mean."""

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float
    mask_mean: float


def apply_mask_trigger(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p, per sample when mask and pattern have a batch dimension."""
    return (1 - mask) * images + mask * pattern


def invert_mask_trigger(model: nn.Module, samples: Callable[[], torch.Tensor], target: int, steps: int,
                        lr: float, cost: float, success: float = 0.99,
                        start: MaskTrigger | None = None) -> MaskTrigger:
    """Neural Cleanse's optimisation towards `target` on fresh batches x = samples() (pixels in
    [0, 1]); `model` frozen in eval mode. Returns the smallest-mask trigger that reached `success`
    (or the last one if none did). `start` continues an earlier inversion."""
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            with torch.no_grad():
                like = samples()
            channels, height, width = like.shape[1:]
            if start is None:
                mask_raw = torch.full((1, height, width), -3.0, device=like.device)   # sigmoid: 5% everywhere
                pattern_raw = torch.zeros((channels, height, width), device=like.device)
            else:
                mask_raw = torch.logit(start.mask.to(like).clamp(1e-4, 1 - 1e-4))
                pattern_raw = torch.logit(start.pattern.to(like).clamp(1e-4, 1 - 1e-4))
            mask_raw.requires_grad_(True)
            pattern_raw.requires_grad_(True)
            optimiser = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
            best, above, below, rate = None, 0, 0, 0.0
            for _ in range(steps):
                with torch.no_grad():
                    x = samples()
                mask, pattern = torch.sigmoid(mask_raw), torch.sigmoid(pattern_raw)
                logits = model(apply_mask_trigger(x, mask, pattern))
                labels = torch.full((len(x),), target, dtype=torch.long, device=x.device)
                loss = F.cross_entropy(logits, labels) + cost * mask.sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    rate = float((logits.argmax(1) == target).float().mean())
                    area = float(mask.mean())
                    if rate >= success and (best is None or area < best.mask_mean):
                        best = MaskTrigger(target, mask.detach().clone(), pattern.detach().clone(), rate, area)
                # Neural Cleanse's cost schedule: up while the trigger works, down while it does not
                above, below = (above + 1, 0) if rate >= success else (0, below + 1)
                if above >= 5:
                    cost, above = cost * 1.5, 0
                elif below >= 5:
                    cost, below = cost / 1.5 ** 1.5, 0
                cost = min(max(cost, 1e-6), 1.0)
    finally:
        model.train(was_training)
    if best is not None:
        return best
    with torch.no_grad():
        mask, pattern = torch.sigmoid(mask_raw), torch.sigmoid(pattern_raw)
    area = float(mask.mean())
    return MaskTrigger(target, mask.detach(), pattern.detach(), rate, area if math.isfinite(area) else 1.0)
