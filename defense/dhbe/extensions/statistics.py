"""`mixed_batches`: every batch S meets perturbed in the game carries the perturbation on a share of its
samples only; the rest stay clean (docs/dhbe.md, sixteenth round).

Officially S runs in train mode on a batch whose samples are all patched (the patch regulariser, Gp's
step; here also the blend and mask terms), and batch norm normalises that batch by its own statistics:
the shift a trigger adds to a channel is subtracted before S sees it, S learns to ignore only the rest,
and its running statistics, mostly of perturbed batches, damp the trigger at test time. Measured in the
fifteenth round: with the statistics re-estimated on clean images, the corner patch's backdoor came
back (ASR x1 0 -> 83%). In a mixed batch the trigger's shift stays visible against the batch's clean
samples, so S must learn to ignore it in its weights, and its running statistics are nearer to clean.
The perturbed rows are spread evenly over the batch (every data-parallel slice gets its share).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.spec import require


@extension
@dataclass(frozen=True)
class MixedBatchesConfig(ExtensionConfig):
    name = "mixed_batches"
    perturbed_share: float = 0.5   # of each perturbed batch's samples, those that carry the perturbation

    def __post_init__(self) -> None:
        require(0 < self.perturbed_share < 1,
                f"mixed_batches.perturbed_share is a fraction in (0, 1), got {self.perturbed_share}")

    def build(self, trainer: Any) -> Extension:
        return MixedBatches(self)


def evenly_spread(rows: int, share: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask over `rows` with floor(share * rows) True rows, spread evenly."""
    index = torch.arange(rows + 1, device=device, dtype=torch.float64)
    steps = torch.floor(index * share)
    return steps[1:] > steps[:-1]


class MixedBatches(Extension):
    def perturbed_batch(self, trainer, clean: torch.Tensor, perturbed: torch.Tensor) -> Optional[torch.Tensor]:
        keep = evenly_spread(len(clean), self.config.perturbed_share, clean.device).view(-1, *([1] * (clean.dim() - 1)))
        return torch.where(keep, perturbed, clean)
