"""`verdict`: decide from data-free evidence whether there is anything to erase, and guard what is
handed back (docs/dhbe.md, "one default").

Before the game, the blend search inverts one blend pattern per class against T on G's samples; a
backdoor of any kind measured so far (patch, DBA, blended, SIG; central and FedAvg) made its target's
pattern anomalously easy to find (anomaly index >= 3.9 against <= 1.4 on clean models, dev cases).
Given earlier versions of the model (a federated server's global models of earlier rounds, the
trainer's `earlier`), the same search runs on each (on the samples of the copy of G fitted to the
model's priors), and a class is a suspect only when it stands out in at least `votes` of the versions
(the model included): a backdoor shows while the attack runs and
can fade from the last model once it stops, where a naturally easy class flickers (twelfth round).
With no suspect class the game stops and T is handed back unchanged (a clean model keeps its ACC),
or, with `hand_back_clean` off, the game runs blind: every class's blend pattern in the bank (it
erased the three backdoors this verdict missed, at 1.4-5.9 ACC points on clean models; round eleven).
With a suspect, the recipe's regularisers run as listed, and the guard checks every epoch's
synthetic agreement of the output with T: if the last epoch's falls below `min_agreement`, the
output of the last epoch that met it is handed back (or T if none did), and the report says so.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from defense.blend_search import ClassPatterns
from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.spec import require


@extension
@dataclass(frozen=True)
class VerdictConfig(ExtensionConfig):
    name = "verdict"
    requires = ("blend_search",)
    hand_back_clean: bool = True     # no suspect class: stop and hand T back unchanged (False: erase blind,
                                     # every class's blend pattern in the bank; eleventh round)
    min_agreement: float = 0.7       # the guard's floor on synthetic agreement with T (0: no guard)
    votes: int = 2                   # with earlier versions: a suspect stands out in at least this many of
                                     # the versions probed, the model included (in all of them, if fewer)

    def __post_init__(self) -> None:
        require(0 <= self.min_agreement < 1, f"verdict.min_agreement must be in [0, 1), got {self.min_agreement}")
        require(1 <= self.votes <= 1000, f"verdict.votes must be in 1..1000, got {self.votes}")

    def build(self, trainer: Any) -> Extension:
        return Verdict(self)


class Verdict(Extension):
    def __init__(self, config: VerdictConfig) -> None:
        super().__init__(config)
        self.suspects: Optional[list[int]] = None
        self.last_good: Optional[dict] = None       # the output model's state after the last epoch that met the floor
        self.fallback: Optional[str] = None          # what the guard did, if anything
        self.fallback_model: Optional[nn.Module] = None
        self.earlier_index: list[list[float]] = []  # the blend search's anomaly index on each earlier version
        self.earlier_found: list[ClassPatterns] = []  # and its patterns and losses (this process only, not kept)

    def name_suspects(self, trainer, anomaly_index: list[float], threshold: float) -> Optional[list[int]]:
        """With earlier versions of the model: the blend search on each, and the classes over the
        threshold in at least `votes` of all the versions (the model's own `anomaly_index` included)."""
        if not trainer.earlier_teachers or threshold == 0:
            return None
        fitted = trainer.extension("blend_search").search_generator.state_dict()   # fitted to the model's priors
        self.earlier_found = [earlier_search(trainer, model, fitted) for model in trainer.earlier_teachers]
        self.earlier_index = [found.anomaly_index() for found in self.earlier_found]
        return voted_suspects([*self.earlier_index, anomaly_index], threshold, self.config.votes)

    def epoch_start(self, trainer) -> None:
        if trainer.epoch != 0 or self.suspects is not None:
            return
        search = trainer.extension("blend_search")
        self.suspects = list(search.suspects)
        if not self.suspects and self.config.hand_back_clean:
            versions = f" in {len(self.earlier_index) + 1} versions of the model" if self.earlier_index else ""
            trainer.stop("no backdoor found: no class's blend pattern was anomalously easy to invert"
                         f"{versions} (largest anomaly index {max(search.evidence()['anomaly_index']):.2f}, "
                         f"threshold {search.config.suspect_threshold}); the model is handed back unchanged "
                         "(a weakened backdoor can hide here: docs/dhbe.md rounds 11-12; give the run's earlier "
                         "global models, or set verdict.hand_back_clean=false to erase blind)")
        elif not self.suspects:
            search.keep_every_class()

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
        if trainer.stop_reason is not None and self.suspects == [] and self.config.hand_back_clean:
            return trainer.teacher
        return self.fallback_model

    def report(self, trainer) -> Optional[dict[str, Any]]:
        search = trainer.extension("blend_search").evidence() or {}
        bank = trainer.extension("trigger_bank")
        found = {"backdoor_suspected": bool(self.suspects), "suspected_targets": self.suspects or [],
                 "anomaly_index": [round(v, 3) for v in search.get("anomaly_index", [])]}
        if self.earlier_index:
            found["earlier_anomaly_index"] = [[round(v, 3) for v in index] for index in self.earlier_index]
        if bank is not None and len(bank.bank):
            found["patch_probe"] = bank.measure(trainer)
        if trainer.history:
            found["final_synthetic_agreement"] = trainer.history[-1].synthetic_agreement
            found["final_trigger_sensitivity"] = trainer.history[-1].trigger_sensitivity
        if self.fallback:
            found["guard"] = self.fallback
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"suspects": self.suspects, "last_good": self.last_good, "earlier_index": self.earlier_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.suspects, self.last_good = state.get("suspects"), state.get("last_good")
            self.earlier_index = list(state.get("earlier_index", []))


def voted_suspects(indices: list[list[float]], threshold: float, votes: int) -> list[int]:
    """Classes whose anomaly index exceeds `threshold` in at least `votes` of the versions' index
    vectors (in all of them when there are fewer)."""
    needed = min(votes, len(indices))
    return [k for k in range(len(indices[0])) if sum(index[k] > threshold for index in indices) >= needed]


def earlier_search(trainer, model: nn.Module, fitted_generator: dict) -> ClassPatterns:
    """The blend search's per-class patterns on an earlier version of the model: the same search and seed as
    on the model itself, in a throw-away game on that version, on the samples of the copy of G fitted
    to the model's own priors (`fitted_generator`, its state; no warm-up per version: thirteenth round,
    the same suspects on 11 of 12 runs, the twelfth now right, about 25 s less for three versions)."""
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    recipe = trainer.recipe.without("verdict", "mask_search").with_overrides({"blend_search.warmup_steps": 0})
    with torch.random.fork_rng(devices=devices):   # the throw-away game seeds torch; the real one goes on as it would
        probe = type(trainer)(model, trainer.spec, recipe, trainer.device)
        probe.sample_generator.load_state_dict(fitted_generator)   # the search copies G, then 0 warm-up steps
        search = probe.extension("blend_search")
        with probe.searches_in_fp32():
            search.probe(probe)
    return search.found
