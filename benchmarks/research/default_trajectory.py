"""Per-epoch trajectory of the default purification on named cases (a research diagnostic):
`python -m benchmarks.research.default_trajectory --only CASE [CASE ...] [--set FIELD=VALUE ...] [--out STEM]`.

Each epoch records the data-free signals the defence can see (synthetic agreement with T, Gp's
trigger sensitivity and flip rate) beside the experimenter's test ACC/ASR of the output model. The
test figures are for reading the trajectory only: no rule of the defence may be fitted to them.
Writes STEM.jsonl (one line per case and epoch; --out STEM, default runs/bench/default_trajectory; a
committed trajectory: --out benchmarks/results/default_trajectory_...)."""
from __future__ import annotations

import json

import torch

from benchmarks.default_cases import by_name, plant
from defense.dhbe import recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.scenario import model_file_scenario
from benchmarks.tables import add_out_argument, write_output
from defense.cli import ArgumentParser

SIGNALS = ("synthetic_agreement", "trigger_sensitivity", "trigger_flip_rate")


def trajectory(case, recipe_name: str, overrides: dict, tiny: bool = False) -> list[dict]:
    scenario = model_file_scenario(plant(case, tiny=tiny))
    before = scenario.evaluate(scenario.teacher)
    recipe = recipe_config(recipe_name, overrides)
    if tiny:
        recipe = smoke_sized(recipe)
    trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe)
    rows = []
    for record in train_epochs(trainer, evaluator=lambda model: scenario.evaluate(model.eval())):
        test = record.evaluation or {}
        rows.append({"case": case.name, "epoch": record.epoch, "seconds": round(record.seconds, 2), "acc_before": before["acc"],
                     **{k: round(getattr(record, k), 4) for k in SIGNALS},
                     **{f"test_{k}": (None if v is None else round(v, 4)) for k, v in test.items()}})
    return rows


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", default=["badnets3-corner-central"],
                        help="case names (benchmarks/default_cases.py)")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    add_out_argument(parser, "default_trajectory", (".jsonl",))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    overrides = field_pairs(args.set, "--set")
    lines = []
    for name in args.only:
        case = by_name(name)
        if case is None:
            parser.error(f"unknown case {name!r}")
        for row in trajectory(case, args.recipe, overrides, args.tiny):
            print(json.dumps(row), flush=True)
            lines.append(json.dumps(row))
    if not args.tiny:
        write_output(args, ".jsonl", "\n".join(lines) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.research.default_trajectory")   # a bad --set value: one line, exit 2
