"""`clean_batch_statistics`: S's forwards on perturbed inputs normalised with the batch-norm statistics
of its latest clean batch (docs/dhbe.md, fifteenth round).

In the official game S runs in train mode on a perturbed batch (Gp's patches, the blend and mask terms)
and normalises it by that batch's own statistics: the shift a trigger adds to a channel's mean is
subtracted before S sees it, so S learns to ignore only the rest, and its running statistics, mostly
of perturbed batches, then damp the trigger at test time. Measured: re-estimated on clean images, a
handed-back model's corner-patch backdoor came back (ASR x1 0 -> 83%). Here every train-mode pass of
S on clean samples records each batch-norm layer's batch mean and variance, and every perturbed pass
is normalised with the latest record instead (no running statistics updated), as a triggered test
input is normalised with statistics of clean inputs.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension


@extension
@dataclass(frozen=True)
class CleanBatchStatisticsConfig(ExtensionConfig):
    name = "clean_batch_statistics"

    def build(self, trainer: Any) -> Extension:
        return CleanBatchStatistics(self)


class CleanBatchStatistics(Extension):
    def setup(self, trainer) -> None:
        self.perturbed = False
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, norm in enumerate(m for m in trainer.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            norm.forward = types.MethodType(self._forward(index, type(norm).forward), norm)

    def _forward(self, index: int, official):
        def forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
            if not norm.training:
                return official(norm, x)
            if self.perturbed and index in self.recorded:
                mean, var = self.recorded[index]
                return F.batch_norm(x, mean, var, norm.weight, norm.bias, False, 0.0, norm.eps)
            if not self.perturbed:
                dims = [d for d in range(x.dim()) if d != 1]
                with torch.no_grad():
                    self.recorded[index] = (x.mean(dims).float(), x.var(dims, unbiased=False).float())
            return official(norm, x)
        return forward

    def perturbed_pass(self, trainer, entering: bool) -> None:
        self.perturbed = entering
