"""The epoch loop, written once: `defense.dhbe.purify`, the Ray Train job (deploy/) and the Ray Tune
trials (tuning/) all run `train_epochs`; they differ only in what they do after each epoch."""
from __future__ import annotations

import time
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from defense.dhbe.config import DHBEConfig, Recipe
from defense.dhbe.game import DHBETrainer, EpochRecord
from defense.dhbe.parallel import SINGLE_PROCESS, SingleProcess
from defense.scan import ScanReport, scan
from defense.spec import InputSpec

Evaluator = Callable[[nn.Module], dict]


class EpochCallback(Protocol):
    def __call__(self, record: EpochRecord, trainer: DHBETrainer, last: bool) -> None: ...


def train_epochs(trainer: DHBETrainer, evaluator: Optional[Evaluator] = None,
                 on_epoch: Optional[EpochCallback] = None, budget_s: Optional[float] = None) -> list[EpochRecord]:
    """Run the remaining epochs (a resumed trainer continues where it stopped). `evaluator` is the
    experimenter's optional measuring stick (e.g. test ACC/ASR): its numbers go into each record's
    `evaluation` and are never read by the defence. `budget_s`: stop after the epoch in which this
    many seconds have passed; `on_epoch(record, trainer, last)` runs after every epoch. An extension
    that stops the game (`trainer.stop`) makes that epoch the last."""
    started = time.perf_counter()
    while trainer.epoch < trainer.config.epochs:
        record = trainer.run_epoch()
        if evaluator is not None:
            record.evaluation = evaluator(trainer.output_model())
        # over budget in any data-parallel process: all stop (clocks differ; they must agree)
        over_budget = budget_s is not None and trainer.parallel.any(time.perf_counter() - started >= budget_s)
        last = trainer.epoch == trainer.config.epochs or trainer.stop_reason is not None or over_budget
        if on_epoch is not None:
            on_epoch(record, trainer, last)
        if last:
            break
    return trainer.history


def scan_stage(model: nn.Module, spec: InputSpec, recipe: Recipe | DHBEConfig, earlier: Sequence[nn.Module] = (),
               device: torch.device | str = "cpu") -> Optional[ScanReport]:
    """The defence's first stage: the recipe's scan of `model` (with its `earlier` versions, oldest
    first), or None when the recipe has no scan. The game is built with what it returns."""
    if not isinstance(recipe, Recipe) or recipe.scan is None:
        return None
    return scan(model, spec, earlier, recipe.scan, device)


def scanned_trainer(teacher: nn.Module, spec: InputSpec, recipe: Recipe | DHBEConfig,
                    device: torch.device | str = "cpu", earlier: Sequence[nn.Module] = (),
                    parallel: SingleProcess = SINGLE_PROCESS) -> DHBETrainer:
    """The defence's stages in order: the recipe's scan of `teacher` (and its `earlier` versions), then
    the game built with its report."""
    return DHBETrainer(teacher, spec, recipe, device, scan_stage(teacher, spec, recipe, earlier, device), parallel)


def purify(model: nn.Module, spec: InputSpec, recipe: Recipe | DHBEConfig,
           callbacks: tuple[Callable[[EpochRecord, DHBETrainer], None], ...] = (),
           evaluator: Optional[Evaluator] = None, device: torch.device | str = "cpu",
           earlier: Sequence[nn.Module] = ()) -> tuple[nn.Module, list[EpochRecord]]:
    """Erase backdoors from `model` without data, in the recipe's stages (scan, then the game): returns
    (purified model, per-epoch history)."""
    trainer = scanned_trainer(model, spec, recipe, device, earlier)

    def each_epoch(record: EpochRecord, trainer: DHBETrainer, last: bool) -> None:
        for callback in callbacks:
            callback(record, trainer)

    train_epochs(trainer, evaluator, each_epoch)
    return trainer.output_model().eval(), trainer.history


def evidence_line(evidence: dict) -> str:
    """One plain line for a user: what the scan found, and what the purification did with it (handed
    back unchanged, erased, or erased with the guard's fallback)."""
    scan, verdict = evidence.get("scan"), evidence.get("verdict") or {}
    if not scan:
        return "evidence: " + (", ".join(sorted(evidence)) or "none recorded")
    if evidence.get("stopped"):
        return f"scan: {evidence['stopped']}"
    if verdict.get("guard"):   # the erasure cost too much agreement: what was handed back instead
        return f"scan: {scan['summary']}; {verdict['guard']}"
    line = f"scan: {scan['summary']}; erased"
    agreement, floor = verdict.get("final_synthetic_agreement"), verdict.get("min_agreement")
    if agreement is not None:
        line += (f" (the purified model agrees with the input on {100 * agreement:.0f}% of synthetic samples"
                 + (f"; the guard's floor is {100 * floor:.0f}%" if floor else "") + ")")
    return line
