"""Departures in the schedule and in the model handed back.

- `lambda_step`: lambda becomes `after` once the share `at` of the epochs is done (erase at full
  strength, then let the distillation restore ACC; docs/dhbe.md, fifth round).
- `student_ema`: hand back an exponential moving average of S (decay per student step).
- `batchnorm_refit`: the handed-back model's batch-norm statistics re-estimated on clean synthetic
  samples (docs/dhbe.md, fifteenth round). In the game S runs in train mode on G's samples and on
  their patched, blended and stamped copies alike, so its running statistics are mostly those of
  perturbed inputs; the refit replaces them with the statistics of samples from the blend search's
  copy of G, fitted to T's priors alone. Weights are untouched; T handed back is never changed.
"""
from __future__ import annotations

import copy
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
        return {"averaged": copy.deepcopy(self.averaged.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("averaged"):
            self.averaged.load_state_dict(state["averaged"])


@extension
@dataclass(frozen=True)
class BatchNormRefitConfig(ExtensionConfig):
    name = "batchnorm_refit"
    requires = ("blend_search",)
    batches: int = 16        # batches of the core's batch size: the samples the statistics are estimated on

    def __post_init__(self) -> None:
        require(1 <= self.batches <= 1000, f"batchnorm_refit.batches must be in 1..1000, got {self.batches}")

    def build(self, trainer: Any) -> Extension:
        return BatchNormRefit(self)


class BatchNormRefit(Extension):
    SEED_OFFSET = 91   # the samples' own random stream: the game's streams are untouched

    def finish_output(self, trainer, model: nn.Module) -> nn.Module:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        search = trainer.extension("blend_search")
        if model is trainer.teacher or not norms or search.found is None:
            return model
        refitted = copy.deepcopy(model)
        was_training = search.search_generator.training
        search.search_generator.eval()
        generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed + self.SEED_OFFSET)
        for norm in (m for m in refitted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            norm.reset_running_stats()
            norm.momentum = None   # the cumulative average over all the batches
        refitted.train()
        with torch.no_grad():
            for _ in range(self.config.batches):
                z = torch.randn(trainer.config.batch_size, trainer.config.latent_dim, generator=generator,
                                device=trainer.device)
                refitted(trainer.spec.denormalise(search.search_generator(z)))
        for new, old in zip((m for m in refitted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), norms):
            new.momentum = old.momentum
        search.search_generator.train(was_training)
        return refitted.train(model.training)
