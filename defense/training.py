"""Supervised training of a classifier (the experimenter's side: clients, tests, benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from defense.data import Split
from defense.spec import require


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")


def train_classifier(model: nn.Module, data: Split, config: TrainConfig, cosine: bool = True,
                     after_step: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Plain mini-batch SGD with momentum (and a cosine learning-rate schedule); returns `model`.
    `after_step(model)` runs after every optimiser step (e.g. a projection of the weights)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(data) // config.batch_size))
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.epochs * steps_per_epoch)
                if cosine else None)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), config.batch_size):
            index = order[start:start + config.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(data.images[index].to(device)), data.labels[index].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if after_step is not None:
                after_step(model)
            if schedule is not None:
                schedule.step()
    model.eval()
    return model
