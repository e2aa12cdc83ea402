"""Priors that pull a sample generator's images towards what a classifier saw in training, data-free:
DHBE's official total-variation image prior, DeepInversion's batch-norm statistics (Yin et al., CVPR
2020) and DAFL's class balance (Chen et al., ICCV 2019). Used by the scanner's sample generator
(defense/scan) and by the game's generator priors (defense/dhbe/extensions/generator_priors.py)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
import torch.nn.functional as F


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """Smoothness prior on G's samples (official `get_image_prior_losses_l2`)."""
    x = x.float()
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return dh.pow(2).mean() + dw.pow(2).mean()


class BatchNormStatistics:
    """|batch mean - running mean|_2 + |batch var - running var|_2 at T's BN layers (all of them, or
    the first `first_layers`), collected while `enabled`."""

    def __init__(self, teacher: nn.Module, first_layers: int = 0, parallel: Optional[Any] = None) -> None:
        self.parallel = parallel   # a data-parallel game's (defense.dhbe.parallel): the whole batch's statistics
        self.losses: list[torch.Tensor] = []
        layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.layers = layers[:first_layers or len(layers)]
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self.device = next(teacher.parameters()).device
        self.enabled = False

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if self.parallel is not None:
            mean, var = self.parallel.mean_and_variance(x, (0, 2, 3))
        else:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def collect(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros((), device=self.device)
        self.losses = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def class_imbalance(logits: torch.Tensor, parallel: Optional[Any] = None) -> torch.Tensor:
    """log K - H(mean softmax): zero when a batch's samples spread evenly over the K classes (in a
    data-parallel game, the whole batch's)."""
    probabilities = F.softmax(logits, dim=1)
    mean_probability = parallel.mean(probabilities, (0,)) if parallel is not None else probabilities.mean(0)
    entropy = -(mean_probability * torch.log(mean_probability.clamp_min(1e-12))).sum()
    return math.log(logits.shape[1]) - entropy
