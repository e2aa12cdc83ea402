"""Where the default purification's time goes, by phase, on a case as the default table runs it (the
model, and for a federated case its earlier global models) or on a federated run folder as the server
hook picks its models: `python -m benchmarks.default_time [--only CASE ...] [--run RUN_FOLDER ...]
[--compare REF] [--set FIELD=VALUE ...] [--out STEM]`. With `--compare REF`, REF's default purification
of the same model files is timed in the same run, after this tree's (a worktree of REF, in a subprocess).

The phases are the defence's own records: the scan's `seconds_by_stage` and the game's
`seconds_by_phase` (defense/dhbe/game.py clocks its warm-up and refreshes, student, G and Gp steps and
diagnostics); nothing is wrapped from outside. Writes STEM.md (a table per case; --out STEM, default
runs/bench/default_time; the committed table: --out benchmarks/results/default_time) and prints it."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.default_cases import by_name
from benchmarks.default_table import case_model
from benchmarks.worktree import run_at_commit
from defense.dhbe import recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.modelio import load_model
from defense.report import markdown_table
from defense.scan.versions import run_folder_versions
from defense.scenario import model_file_scenario
from benchmarks.tables import add_out_argument, write_output
from defense.cli import ArgumentParser
from defense.errors import ConfigError


REFERENCE = """
import json, sys, time
import torch
from defense.dhbe import recipe_config, scanned_trainer, train_epochs
from defense.modelio import load_model
torch.set_num_threads(2)
final = load_model(sys.argv[2]); earlier = [load_model(p).model.eval() for p in sys.argv[3:]]
started = time.perf_counter()
trainer = scanned_trainer(final.model.eval(), final.spec, recipe_config("default"), earlier=earlier)
train_epochs(trainer)
seconds = time.perf_counter() - started
torch.save(trainer.output_model().state_dict(), sys.argv[1])
print(json.dumps({"seconds": seconds, "epochs": trainer.epoch, "suspects": list(trainer.scan_report.suspects)}))
"""


def model_files_of(name: str, tiny: bool) -> tuple[Path, tuple[Path, ...]]:
    """A case's files (benchmarks/default_cases.py), or a run folder's final model and earlier ones."""
    case = by_name(name)
    if case is not None:
        return case_model(case, tiny=tiny, history=True)
    final, earlier = run_folder_versions(Path(name))
    return final, tuple(earlier)


def measured(scenario, model) -> str:
    """The experimenter's ACC and ASR (the file's attack record), for the table only."""
    found = scenario.evaluate(model.eval())
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in found.items() if v is not None and k in ("acc", "asr_x1", "asr_x9"))


def time_case(name: str, overrides: dict, tiny: bool = False) -> tuple[list[list], float, str]:
    model_file, earlier = model_files_of(name, tiny)
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
            f"{'stopped: ' + trainer.stop_reason[:40] + '...' if trainer.stop_reason else 'game played'}; "
            f"before: {measured(scenario, scenario.teacher)}; after: {measured(scenario, trainer.output_model())}")
    return rows, wall, note


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="case names (benchmarks/default_cases.py); "
                        "default blended0.2-fedavg unless --run is given")
    parser.add_argument("--run", nargs="*", default=[], metavar="RUN_FOLDER",
                        help="federated run folders: the final model and the earlier ones the hook weighs")
    parser.add_argument("--compare", default=None, metavar="REF", help="a commit whose default purification to time beside")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    add_out_argument(parser, "default_time", (".md",))
    parser.add_argument("--tiny", action="store_true", help="one case at smoke size, printed, not written")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    overrides = field_pairs(args.set, "--set")
    names = (args.only if args.only is not None else ([] if args.run else ["blended0.2-fedavg"])) + args.run
    unknown = [name for name in (args.only or []) if by_name(name) is None]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)} (benchmarks/default_cases.py names them)")
    if not names:
        raise ConfigError("no case and no run folder given (--only CASE ... or --run RUN_FOLDER ...); nothing written")
    command = " ".join(["python -m benchmarks.default_time", *(["--only", *args.only] if args.only else []),
                        *(["--run", *args.run] if args.run else []), *(["--compare", args.compare] if args.compare else []),
                        *(["--set", *args.set] if args.set else [])])
    lines = [f"# Where the default's time goes (`{command}`; 2 CPU cores, in-process, DHBE's own time: no Ray)", ""]
    for name in (names[:1] if args.tiny else names):
        rows, wall, note = time_case(name, overrides, args.tiny)
        lines += [f"## {name}: {wall:.1f} s ({note})", "",
                  *markdown_table(["phase", "seconds", "share"], rows), ""]
        if args.compare and not args.tiny:
            final, earlier = model_files_of(name, False)
            with tempfile.TemporaryDirectory(prefix="compare-out-") as scratch:
                weights = Path(scratch) / "purified.pt"   # written by REF's code in this run: ours to read
                ref = run_at_commit(args.compare, REFERENCE, [str(weights), str(final.resolve()),
                                                               *[str(p.resolve()) for p in earlier]])
                scenario = model_file_scenario(final)
                scenario.teacher.load_state_dict(torch.load(weights, weights_only=True))
                after = measured(scenario, scenario.teacher)
            lines += [f"{args.compare}'s default on the same files, in the same run: {ref['seconds']:.1f} s "
                      f"({ref['epochs']} epochs, suspects {ref['suspects']}; after: {after}); this tree: "
                      f"{wall:.1f} s, **{ref['seconds'] / wall:.1f}x faster**.", ""]
        print("\n".join(lines[-len(rows) - 6:]), flush=True)
    if not args.tiny:
        write_output(args, ".md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.default_time")   # a bad --set value: one line, exit 2
