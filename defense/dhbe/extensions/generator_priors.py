"""Departures in G's step: priors that pull G's samples towards what T saw in training.

- `bn_prior`: DeepInversion's prior (Yin et al., CVPR 2020): G's batch statistics at T's batch-norm
  layers match T's running statistics (all layers, or the first `layers` on the input side).
- `class_balance`: DAFL's information-entropy prior (Chen et al., ICCV 2019): G's batch spreads
  evenly over T's classes.
- `prior_only_generator`: G drops its adversarial -L1(S, T) term and follows its priors only.
Measurements: docs/research/dhbe-log.md (first, second and fifth rounds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.priors import BatchNormStatistics, class_imbalance
from defense.spec import require


@extension
@dataclass(frozen=True)
class BatchNormPriorConfig(ExtensionConfig):
    name = "bn_prior"
    weight: float = 1.0
    layers: int = 0          # 0: all of T's BN layers; k > 0: only the first k (input side)

    def __post_init__(self) -> None:
        require(self.weight > 0, f"bn_prior.weight must be > 0, got {self.weight}")
        require(0 <= self.layers <= 10_000, f"bn_prior.layers must be in 0..10000, got {self.layers}")

    def build(self, trainer: Any) -> Extension:
        return BatchNormPrior(self)


class BatchNormPrior(Extension):
    def setup(self, trainer) -> None:
        self.statistics = BatchNormStatistics(trainer.teacher, self.config.layers, trainer.parallel)

    def watch_teacher(self, trainer, on: bool) -> None:
        self.statistics.enabled = on

    def generator_prior(self, trainer, normalised, teacher_logits) -> Optional[torch.Tensor]:
        return self.config.weight * self.statistics.collect()


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
