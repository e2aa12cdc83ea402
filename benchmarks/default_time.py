"""Where the default purification's time goes, by phase, on a case as the default table runs it (the
model, and for a federated case its earlier global models): `python -m benchmarks.default_time --only
CASE [CASE ...] [--set FIELD=VALUE ...] [--out STEM]`.

The phases are the defence's own records: the scan's `seconds_by_stage` and the game's
`seconds_by_phase` (defense/dhbe/game.py clocks its warm-up and refreshes, student, G and Gp steps and
diagnostics); nothing is wrapped from outside. Writes benchmarks/results/<stem>.md (a table per case)
and prints it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.default_cases import by_name
from benchmarks.default_table import case_model
from defense.dhbe import recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.fileio import atomic_write_text
from defense.modelio import load_model
from defense.report import markdown_table
from defense.scenario import model_file_scenario

RESULTS = Path("benchmarks/results")


def time_case(name: str, overrides: dict, tiny: bool = False) -> tuple[list[list], float, str]:
    case = by_name(name)
    model_file, earlier = case_model(case, tiny=tiny, history=True)
    scenario = model_file_scenario(model_file)
    recipe = recipe_config("default", overrides)
    if tiny:   # the game runs blind, so that it runs
        recipe = smoke_sized(recipe).with_overrides({"verdict.hand_back_clean": False})
    started = time.perf_counter()
    trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe,
                              earlier=[load_model(p).model.eval() for p in earlier])
    train_epochs(trainer)
    wall = time.perf_counter() - started
    phases = {f"scan: {stage}": seconds for stage, seconds in trainer.scan_report.seconds_by_stage.items()}
    phases.update({f"game: {phase}": seconds for phase, seconds in trainer.seconds_by_phase.items()})
    rows = [[label, f"{seconds:.1f}", f"{100 * seconds / wall:.0f}%"] for label, seconds in phases.items()]
    other = wall - sum(phases.values())
    rows.append(["the rest (set-up, the weight baseline, EMA, the loop, the guard)", f"{other:.1f}",
                 f"{100 * other / wall:.0f}%"])
    suspects = list(trainer.scan_report.suspects)
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
                  *markdown_table(["phase", "seconds", "share"], rows), ""]
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if not args.tiny:
        atomic_write_text(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.default_time")   # a bad --set value: one line, exit 2
