"""`python -m defense.evaluate MODEL`: ACC/ASR of any model file as one JSON line (the
experimenter's measuring stick; uses the test set and the true trigger). The trigger, target and data
set come from the experiment record the file carries (written by `federated.simulate` and the
scenario builder); any flag given overrides its field of the record."""
from __future__ import annotations

from typing import Optional, Sequence

from defense.cli import ArgumentParser, add_trigger_arguments, json_line, run_main, seed_value
from defense.data import DATASETS
from defense.scenario import model_file_scenario


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m defense.evaluate", description=__doc__)
    parser.add_argument("model", help="model file (.json manifest, .safetensors, or weights-only .pt)")
    parser.add_argument("--dataset", default=None, choices=DATASETS.names(), help="test data to measure on (default: the model file's experiment record)")
    parser.add_argument("--data-dir", default=None, help="folder (or Parquet file) of a local data set")
    parser.add_argument("--trigger-seed", type=seed_value, default=None, help="seed of the trigger pattern: blended noise, random places (default: the model file's experiment record)")
    add_trigger_arguments(parser, from_record=True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"dataset": args.dataset, "attack": args.attack, "trigger_size": args.trigger_size,
                 "target": args.target, "blend_alpha": args.blend_alpha, "trigger_seed": args.trigger_seed,
                 "place": args.trigger_place, "pattern": args.trigger_pattern}
    scenario = model_file_scenario(args.model, overrides, args.data_dir)
    metrics = scenario.evaluate(scenario.teacher)
    experiment = scenario.experiment
    print(json_line({"model": str(args.model), "dataset": experiment.dataset, "attack": experiment.attack,
                      "trigger_size": experiment.trigger_size, "place": experiment.place, "pattern": experiment.pattern,
                      "trigger_seed": experiment.trigger_seed,
                      "target": experiment.target, "experiment_from": scenario.experiment_source,
                      "overridden": sorted(k for k, v in overrides.items() if v is not None), **metrics}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m defense.evaluate")
