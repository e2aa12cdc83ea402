"""Where the default purification's time goes, by phase, on a case as the default table runs it (the
model, and for a federated case its earlier global models): `python -m benchmarks.default_time --only
CASE [CASE ...] [--set FIELD=VALUE ...] [--out STEM]`.

Each phase is timed by wrapping the trainer's and the extensions' methods on this one trainer (nothing
in defense/ changes); a phase's seconds are its own, without the phases it calls (the blend search's
first search without the verdict's searches of the earlier versions it triggers). The steps the trigger
bank's warm-up and the searches take count to them, not to the game. Writes
benchmarks/results/<stem>.md (a table per case) and prints it."""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.default_cases import by_name
from benchmarks.default_table import case_model
from defense.dhbe import DHBETrainer, recipe_config, scan_stage, smoke_sized, train_epochs
from defense.fileio import atomic_write_text
from defense.modelio import load_model
from defense.report import markdown_table
from defense.scenario import model_file_scenario

RESULTS = Path("benchmarks/results")
# (object name, method, phase label); "trainer" is the DHBETrainer, other names its extensions
HOOKS = [
    ("blend_search", "probe", "blend search, first (G copy warm-up + the suspects' inversions)"),
    ("trigger_bank", "probe", "trigger bank warm-up (Gp against S = T)"),
    ("mask_search", "probe", "mask search, first (against T)"),
    ("blend_search", "epoch_start", "blend search, re-searches against S"),
    ("mask_search", "epoch_start", "mask search, re-searches against S"),
    ("blend_search", "student_terms", "game: blend term"),
    ("mask_search", "student_terms", "game: mask term"),
    ("trainer", "student_step", "game: student steps (distillation, patch regulariser)"),
    ("trainer", "generator_step", "game: G steps"),
    ("trainer", "trigger_step", "game: Gp steps"),
    ("trainer", "diagnostics", "per-epoch data-free diagnostics"),
]
SEARCHES = {label for _, method, label in HOOKS if method in ("probe", "epoch_start")}
SCAN = "scan stage (the model and its earlier versions, every class at once)"


class PhaseClock:
    """Self time per phase label; a call made inside a search counts to that search."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []   # [label, time spent in callees]

    def wrap(self, owner, method: str, label: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            search = next((frame[0] for frame in self.stack if frame[0] in SEARCHES), None)
            own = search if search is not None and label not in SEARCHES else label
            self.stack.append([own, 0.0])
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                _, callees = self.stack.pop()
                self.seconds[own] += elapsed - callees
                if own == label:   # a call inside a search is that search's
                    self.calls[label] += 1
                if self.stack:
                    self.stack[-1][1] += elapsed

        setattr(owner, method, timed)


def time_case(name: str, overrides: dict, tiny: bool = False) -> tuple[list[list], float, str]:
    case = by_name(name)
    model_file, earlier = case_model(case, tiny=tiny, history=True)
    scenario = model_file_scenario(model_file)
    recipe = recipe_config("default", overrides)
    if tiny:   # the game runs blind on every class, so that it runs
        recipe = smoke_sized(recipe).with_overrides({"verdict.hand_back_clean": False})
    started = time.perf_counter()
    found = scan_stage(scenario.teacher, scenario.bundle.spec, recipe, [load_model(p).model.eval() for p in earlier])
    scanned = time.perf_counter() - started
    trainer = DHBETrainer(scenario.teacher, scenario.bundle.spec, recipe, scan=found)
    clock = PhaseClock()
    clock.seconds[SCAN], clock.calls[SCAN] = scanned, 1
    for owner_name, method, label in HOOKS:
        owner = trainer if owner_name == "trainer" else trainer.extension(owner_name)
        if owner is not None:
            clock.wrap(owner, method, label)
    train_epochs(trainer)
    wall = time.perf_counter() - started
    rows = [[label, f"{clock.seconds[label]:.1f}", f"{100 * clock.seconds[label] / wall:.0f}%", clock.calls[label]]
            for label in [SCAN] + [label for _, _, label in HOOKS] if clock.calls[label]]
    other = wall - sum(clock.seconds.values())
    rows.append(["the rest (set-up, EMA, the loop, the guard)", f"{other:.1f}", f"{100 * other / wall:.0f}%", ""])
    suspects = trainer.evidence().get("verdict", {}).get("suspected_targets", [])
    note = (f"{len(earlier)} earlier versions, {trainer.epoch} epochs, suspects {suspects}, "
            f"{'stopped: ' + trainer.stop_reason[:40] + '...' if trainer.stop_reason else 'game played'}")
    return rows, wall, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", default=["blended0.2-fedavg"], help="case names (benchmarks/default_cases.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="default_time")
    parser.add_argument("--tiny", action="store_true", help="one case at smoke size, printed, not written")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    overrides = field_pairs(args.set, "--set")
    unknown = [name for name in args.only if by_name(name) is None]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)} (benchmarks/default_cases.py names them)")
    lines = ["# Where the default's time goes (`python -m benchmarks.default_time`; 2 CPU cores, in-process, "
             "DHBE's own time)", ""]
    for name in (args.only[:1] if args.tiny else args.only):
        rows, wall, note = time_case(name, overrides, args.tiny)
        lines += [f"## {name}: {wall:.1f} s ({note})", "",
                  *markdown_table(["phase", "seconds", "share", "calls"], rows), ""]
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if not args.tiny:
        atomic_write_text(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.default_time")   # a bad --set value: one line, exit 2
