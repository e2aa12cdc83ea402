"""Data-free search for blended backdoors (a departure from DHBE; docs/dhbe.md, sixth round).

DHBE's trigger generator models small patches; a blended trigger, x' = (1 - a) x + a p, is a
full-image perturbation it never finds. Neural Cleanse (Wang et al., S&P 2019) reverse-engineers a
trigger per class from clean data; here the clean data are the sample generator's images, and the
trigger has the blend form: for every class k a universal pattern p_k that, blended in at a small
`ratio`, makes the model answer k on the synthetic samples. A blended backdoor is a shortcut: its
target's pattern is found with a far smaller loss than any other class's, and that outlier can be
told apart without data (anomaly index, as in Neural Cleanse: distance below the median in units of
the median absolute deviation, here of the log losses).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from defense.generators import blend_patterns
from defense.models import frozen

MIN_LOG_SPREAD = 0.25   # a factor of 1.28 between losses: below it, differences are noise


@dataclass
class ClassPatterns:
    """One inverted blend pattern per searched class (in [-1, 1], as `blend_patterns` takes them) and
    the model's cross-entropy towards that class on the last search batch."""

    classes: list[int]
    patterns: torch.Tensor
    losses: list[float]

    def anomaly_index(self) -> list[float]:
        """Per class: (median - log loss) / (1.4826 * MAD) of the log losses; large = suspiciously easy.
        The spread is floored at `MIN_LOG_SPREAD` so that near-equal losses flag nobody."""
        logs = [math.log(max(loss, 1e-12)) for loss in self.losses]   # host-side statistics of floats
        median = statistics.median_low(logs)                            # the lower middle, as torch.median
        spread = max(1.4826 * statistics.median_low([abs(v - median) for v in logs]), MIN_LOG_SPREAD)
        return [(median - v) / spread for v in logs]

    def suspects(self, threshold: float) -> list[int]:
        """Classes whose anomaly index exceeds `threshold` (Neural Cleanse flags > 2)."""
        return [k for k, index in zip(self.classes, self.anomaly_index()) if index > threshold]


def invert_class_patterns(model: nn.Module, samples: Callable[[], torch.Tensor], classes: list[int],
                          ratio: float, steps: int, lr: float,
                          start: torch.Tensor | None = None) -> ClassPatterns:
    """For each class k in `classes`: min over p_k of CE(model((1 - ratio) x + ratio * p_k), k) on
    fresh batches x = samples() (Adam, `steps` steps). `model` is frozen in eval mode; `start` (one
    pattern per class, in [-1, 1]) continues an earlier search instead of starting from flat grey."""
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            with torch.no_grad():
                grey = torch.zeros_like(samples()[0])
            initial = [grey if start is None else torch.atanh(start[i].to(grey).clamp(-0.999, 0.999))
                       for i in range(len(classes))]
            found = [invert_one_class(model, samples, k, ratio, steps, lr, initial[i]) for i, k in enumerate(classes)]
    finally:
        model.train(was_training)
    return ClassPatterns(list(classes), torch.stack([pattern for pattern, _ in found]), [loss for _, loss in found])


def invert_one_class(model: nn.Module, samples: Callable[[], torch.Tensor], k: int, ratio: float, steps: int,
                     lr: float, initial: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One class's pattern (in [-1, 1], the tanh of free parameters starting at `initial`) and its
    final cross-entropy."""
    raw = initial.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([raw], lr=lr)
    loss = torch.zeros((), device=initial.device)
    for _ in range(steps):
        with torch.no_grad():
            x = samples()
        target = torch.full((len(x),), k, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(model(blend_patterns(x, torch.tanh(raw).expand_as(x), ratio)), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    value = float(loss.detach())
    return torch.tanh(raw.detach()), value if math.isfinite(value) else float("inf")
