"""`verdict`: act on what the scan stage found (defense/scan; docs/scan.md), and guard what is handed back.

The scan decides, data-free and before the game, whether the teacher carries a backdoor and towards
which classes (its `ScanReport`, the trainer's `scan_report`; this extension only reads it). No
suspect: the game stops before it starts and T is handed back unchanged (a clean model keeps its
ACC), or, with `hand_back_clean` off, the game runs blind (Gp's patches only: the scan named no
trigger to erase). With a suspect, the recipe's regularisers run as listed, and the guard checks every epoch's
synthetic agreement of the output with T: if the last epoch's falls below `min_agreement`, the
output of the last epoch that met it is handed back (or T if none did), and the report says so.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.spec import require


@extension
@dataclass(frozen=True)
class VerdictConfig(ExtensionConfig):
    name = "verdict"
    reads_scan = True
    hand_back_clean: bool = True     # the scan found nothing: stop and hand T back unchanged (False: erase
                                     # blind, on Gp's patches only)
    min_agreement: float = 0.7       # the guard's floor on synthetic agreement with T (0: no guard)

    def __post_init__(self) -> None:
        require(0 <= self.min_agreement < 1, f"verdict.min_agreement must be in [0, 1), got {self.min_agreement}")

    def build(self, trainer: Any) -> Extension:
        return Verdict(self)


class Verdict(Extension):
    def __init__(self, config: VerdictConfig) -> None:
        super().__init__(config)
        self.last_good: Optional[dict] = None       # the output model's state after the last epoch that met the floor
        self.fallback: Optional[str] = None          # what the guard did, if anything
        self.fallback_model: Optional[nn.Module] = None

    def probe(self, trainer) -> None:
        report = trainer.scan_report
        if not report.backdoored and self.config.hand_back_clean:
            trainer.stop(f"{report.summary()}; the model is handed back unchanged (a weakened backdoor can hide "
                         "here: docs/scan.md lists the scanner's misses; set verdict.hand_back_clean=false to "
                         "erase blind)")

    def epoch_end(self, trainer, record) -> None:
        if trainer.stop_reason is not None or not self.config.min_agreement:
            return
        if record.synthetic_agreement >= self.config.min_agreement:
            self.last_good = {k: v.detach().cpu().clone() for k, v in trainer.output_model().state_dict().items()}
            self.fallback = self.fallback_model = None
        elif trainer.epoch == trainer.config.epochs:
            self._fall_back(trainer, record.synthetic_agreement)

    def _fall_back(self, trainer, agreement: float) -> None:
        if self.last_good is not None:
            self.fallback_model = copy.deepcopy(trainer.output_model())
            self.fallback_model.load_state_dict(self.last_good)
            handed_back = "the last epoch whose agreement met the floor"
        else:
            self.fallback_model, handed_back = trainer.teacher, "the input model (no epoch met the floor)"
        self.fallback = (f"guard: the final model agrees with T on {100 * agreement:.0f}% of synthetic samples "
                         f"(floor {100 * self.config.min_agreement:.0f}%); handed back {handed_back}")

    def output_model(self, trainer) -> Optional[nn.Module]:
        if trainer.stop_reason is not None and not trainer.scan_report.backdoored and self.config.hand_back_clean:
            return trainer.teacher
        return self.fallback_model

    def report(self, trainer) -> Optional[dict[str, Any]]:
        report = trainer.scan_report
        found: dict[str, Any] = {"backdoor_suspected": report.backdoored, "suspected_targets": list(report.suspects),
                                 "verdict": report.summary()}
        if trainer.history and trainer.stop_reason is None:
            found["final_synthetic_agreement"] = trainer.history[-1].synthetic_agreement
            found["min_agreement"] = self.config.min_agreement
            found["final_trigger_sensitivity"] = trainer.history[-1].trigger_sensitivity
        if self.fallback:
            found["guard"] = self.fallback
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"last_good": self.last_good}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.last_good = state.get("last_good")
