"""Departures in the schedule and in the model handed back.

- `lambda_step`: lambda becomes `after` once the share `at` of the epochs is done (erase at full
  strength, then let the distillation restore ACC; docs/research/dhbe-log.md, fifth round).
- `student_ema`: hand back an exponential moving average of S (decay per student step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.spec import require


@extension
@dataclass(frozen=True)
class LambdaStepConfig(ExtensionConfig):
    name = "lambda_step"
    after: float = 0.7     # lambda from the step on
    at: float = 0.5        # share of the epochs after which lambda steps

    def __post_init__(self) -> None:
        require(self.after >= 0, f"lambda_step.after must be >= 0, got {self.after}")
        require(0 < self.at < 1, f"lambda_step.at is a fraction in (0, 1), got {self.at}")

    def build(self, trainer: Any) -> Extension:
        return LambdaStep(self)


class LambdaStep(Extension):
    def lambda_at(self, trainer, lam: float) -> float:
        step_epoch = max(1, int(round(self.config.at * trainer.config.epochs)))
        return self.config.after if trainer.epoch >= step_epoch else lam


@extension
@dataclass(frozen=True)
class StudentEMAConfig(ExtensionConfig):
    name = "student_ema"
    decay: float = 0.995

    def __post_init__(self) -> None:
        require(0 < self.decay < 1, f"student_ema.decay must be in (0, 1), got {self.decay}")

    def build(self, trainer: Any) -> Extension:
        return StudentEMA(self)


class StudentEMA(Extension):
    def setup(self, trainer) -> None:
        self.averaged = torch.optim.swa_utils.AveragedModel(
            trainer.student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.config.decay),
            use_buffers=True)

    def after_student_step(self, trainer) -> None:
        self.averaged.update_parameters(trainer.student)

    def output_model(self, trainer) -> Optional[nn.Module]:
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        import copy

        return {"averaged": copy.deepcopy(self.averaged.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("averaged"):
            self.averaged.load_state_dict(state["averaged"])
