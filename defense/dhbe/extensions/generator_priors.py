"""Departures in G's step: priors that pull G's samples towards what T saw in training.

- `bn_prior`: DeepInversion's prior (Yin et al., CVPR 2020): G's batch statistics at T's batch-norm
  layers match T's running statistics (all layers, or the first `layers` on the input side).
- `class_balance`: DAFL's information-entropy prior (Chen et al., ICCV 2019): G's batch spreads
  evenly over T's classes.
- `prior_only_generator`: G drops its adversarial -L1(S, T) term and follows its priors only.
Measurements: docs/dhbe.md (first, second and fifth rounds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
import torch.nn.functional as F

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.dhbe.parallel import SINGLE_PROCESS, SingleProcess
from defense.spec import require


class BatchNormStatistics:
    """|batch mean - running mean|_2 + |batch var - running var|_2 at T's BN layers (all of them, or
    the first `first_layers`), collected while `enabled`."""

    def __init__(self, teacher: nn.Module, first_layers: int = 0, parallel: SingleProcess = SINGLE_PROCESS) -> None:
        self.parallel = parallel   # a data-parallel game: the statistics of the whole batch
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
        mean, var = self.parallel.mean_and_variance(x, (0, 2, 3))
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def collect(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros((), device=self.device)
        self.losses = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@extension
@dataclass(frozen=True)
class BatchNormPriorConfig(ExtensionConfig):
    name = "bn_prior"
    weight: float = 1.0
    layers: int = 0          # 0: all of T's BN layers; k > 0: only the first k (input side)

    def __post_init__(self) -> None:
        require(self.weight > 0, f"bn_prior.weight must be > 0, got {self.weight}")
        require(self.layers >= 0, f"bn_prior.layers must be >= 0, got {self.layers}")

    def build(self, trainer: Any) -> Extension:
        return BatchNormPrior(self)


class BatchNormPrior(Extension):
    def setup(self, trainer) -> None:
        self.statistics = BatchNormStatistics(trainer.teacher, self.config.layers, trainer.parallel)

    def watch_teacher(self, trainer, on: bool) -> None:
        self.statistics.enabled = on

    def generator_prior(self, trainer, normalised, teacher_logits) -> Optional[torch.Tensor]:
        return self.config.weight * self.statistics.collect()


def class_imbalance(logits: torch.Tensor, parallel: SingleProcess = SINGLE_PROCESS) -> torch.Tensor:
    """log K - H(mean softmax): zero when a batch's samples spread evenly over the K classes (in a
    data-parallel game, the whole batch's)."""
    mean_probability = parallel.mean(F.softmax(logits, dim=1), (0,))
    entropy = -(mean_probability * torch.log(mean_probability.clamp_min(1e-12))).sum()
    return math.log(logits.shape[1]) - entropy


@extension
@dataclass(frozen=True)
class ClassBalanceConfig(ExtensionConfig):
    name = "class_balance"
    weight: float = 1.0

    def __post_init__(self) -> None:
        require(self.weight > 0, f"class_balance.weight must be > 0, got {self.weight}")

    def build(self, trainer: Any) -> Extension:
        return ClassBalance(self)


class ClassBalance(Extension):
    def generator_prior(self, trainer, normalised, teacher_logits) -> Optional[torch.Tensor]:
        return self.config.weight * class_imbalance(teacher_logits, trainer.parallel)


@extension
@dataclass(frozen=True)
class PriorOnlyGeneratorConfig(ExtensionConfig):
    """G's adversarial term at weight 0: the samples follow the priors alone (no fields)."""
    name = "prior_only_generator"

    def build(self, trainer: Any) -> Extension:
        return PriorOnlyGenerator(self)


class PriorOnlyGenerator(Extension):
    def generator_adversarial_weight(self, trainer) -> Optional[float]:
        return 0.0
