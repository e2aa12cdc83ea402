"""The points where a departure plugs into DHBE's game, and the no-op defaults (official behaviour).

An extension is built from its frozen config once the players exist (`setup`), is asked at each point
in the order the recipe lists the extensions, and checkpoints its own state. The points, in the
order a run meets them:

- `setup`                 after T, S, G, Gp and their optimisers are built
- `probe`                 before the game (first epoch): gather data-free evidence (skipped once the game
                          is stopped)
- `epoch_start`           before every epoch's iterations
- `sample_batch`          a student step's (x, T(x)) instead of a fresh G sample
- `samples_seen`          every fresh G sample (with T's logits where the step has them)
- `perturb`               the batch S meets perturbed, from x and Gp's patches (first answer wins;
                          official: one patch added at one random place)
- `lambda_at`             lambda of Eq. 8 for the current epoch
- `generator_adversarial_weight`  G's weight on -L1(S, T) (first answer wins; official 1)
- `watch_teacher`         T's forward in the G step is being observed (priors on T's activations)
- `generator_prior`       extra terms of G's loss
- `after_student_step`    once S's optimiser has stepped
- `epoch_end`             after every epoch, with its data-free record
- `output_model`          the model handed back (first answer wins; official: S)
- `report`                the data-free evidence it gathered (the purified manifest and the run report)

`DHBETrainer.stop(reason)` ends the game before its next iterations (a verdict of "nothing to erase").
What the scan stage found before the game is `trainer.scan_report` (defense.scan.ScanReport), read only.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# defense.dhbe.game.DHBETrainer, which asks the extensions at each point (named, not imported:
# the game imports this module, and imports point one way)
DHBETrainer = Any


class Extension:
    """Runtime object of one departure; every method's default is the official behaviour."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def setup(self, trainer: DHBETrainer) -> None: ...

    def probe(self, trainer: DHBETrainer) -> None: ...

    def epoch_start(self, trainer: DHBETrainer) -> None: ...

    def sample_batch(self, trainer: DHBETrainer) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return None

    def samples_seen(self, trainer: DHBETrainer, pixels: torch.Tensor, teacher_logits: Optional[torch.Tensor]) -> None:
        ...

    def perturb(self, trainer: DHBETrainer, pixels: torch.Tensor, patches: torch.Tensor,
                use: str) -> Optional[torch.Tensor]:
        return None

    def lambda_at(self, trainer: DHBETrainer, lam: float) -> float:
        return lam

    def generator_adversarial_weight(self, trainer: DHBETrainer) -> Optional[float]:
        return None

    def watch_teacher(self, trainer: DHBETrainer, on: bool) -> None: ...

    def generator_prior(self, trainer: DHBETrainer, normalised: torch.Tensor,
                        teacher_logits: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def after_student_step(self, trainer: DHBETrainer) -> None: ...

    def epoch_end(self, trainer: DHBETrainer, record: Any) -> None: ...

    def output_model(self, trainer: DHBETrainer) -> Optional[nn.Module]:
        return None

    def report(self, trainer: DHBETrainer) -> Optional[dict[str, Any]]:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
