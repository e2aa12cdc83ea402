"""Departures in the schedule and in the model handed back.

- `lambda_step`: lambda becomes `after` once the share `at` of the epochs is done (erase at full
  strength, then let the distillation restore ACC; docs/dhbe.md, fifth round).
- `student_ema`: hand back an exponential moving average of S (decay per student step).
- `student_warmup`: S's learning rate ramps up linearly over the first `epochs` epochs (per student
  step). At full rate from the first step, the regularisers knock a copy of a backdoored T far off
  (test ACC 98.9 -> 72% within two epochs on a dev case, recovered only to 92-94% by epoch 50;
  docs/dhbe.md, tenth round).
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


@extension
@dataclass(frozen=True)
class StudentWarmupConfig(ExtensionConfig):
    name = "student_warmup"
    epochs: float = 5.0    # epochs over which S's learning rate ramps from ~0 to its scheduled value

    def __post_init__(self) -> None:
        require(0 < self.epochs <= 1000, f"student_warmup.epochs must be in (0, 1000], got {self.epochs}")

    def build(self, trainer: Any) -> Extension:
        return StudentWarmup(self)


class StudentWarmup(Extension):
    """Sets S's learning rate before each student step to base x (step + 1) / ramp steps, base being
    the student schedule's base rate (which the divergence rollback halves); after the ramp it leaves
    the rate to the schedule (MultiStepLR scales the rate it finds, so it finds the base exactly)."""

    def setup(self, trainer) -> None:
        self.steps = 0
        self._set_rate(trainer)

    def _ramp_steps(self, trainer) -> int:
        cfg = trainer.config
        return max(1, int(round(self.config.epochs * cfg.iters_per_epoch * cfg.student_steps)))

    def _set_rate(self, trainer) -> None:
        ramp = self._ramp_steps(trainer)
        if self.steps >= ramp + 1:
            return
        base = trainer.schedules[0].base_lrs[0]
        for group in trainer.opt_student.param_groups:
            group["lr"] = base * min(1.0, (self.steps + 1) / ramp)

    def after_student_step(self, trainer) -> None:
        self.steps += 1
        self._set_rate(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.steps = int(state["steps"])
