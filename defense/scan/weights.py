"""A weight-only baseline in the spirit of DFBScanner (arXiv 2605.18907): it reads only the final
layer's parameters. A backdoor's target class is learnt as one more, very easy feature, and the
training that plants it pushes the target's output weights and bias up; per class, the bias and the
norm of the weight row, each as a robust z-score over the classes (median and MAD), and the larger
of the two as the class's score. No inversion, no samples: about a millisecond per model."""
from __future__ import annotations

import statistics

from torch import nn


def final_layer(model: nn.Module, num_classes: int) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not layers:
        raise ValueError(f"the model has no linear layer with {num_classes} outputs")
    return layers[-1]


def robust_z(values: list[float]) -> list[float]:
    """(v - median) / (1.4826 MAD), the spread floored at 1e-6 of the values' scale."""
    median = statistics.median(values)
    spread = 1.4826 * statistics.median([abs(v - median) for v in values])
    spread = max(spread, 1e-6 * max(1.0, max(abs(v) for v in values)))
    return [(v - median) / spread for v in values]


def weight_scores(model: nn.Module, num_classes: int) -> list[float]:
    """Per class: max(z of the bias, z of the weight row's norm); large = suspicious."""
    layer = final_layer(model, num_classes)
    norms = layer.weight.detach().float().norm(dim=1).tolist()
    bias = layer.bias.detach().float().tolist() if layer.bias is not None else [0.0] * num_classes
    return [max(b, n) for b, n in zip(robust_z(bias), robust_z(norms))]
