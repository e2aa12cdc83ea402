"""`python -m defense.evaluate MODEL --dataset NAME --attack KIND ...`: ACC/ASR of any model file
as one JSON line (the experimenter's measuring stick; uses the test set and the true trigger)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from defense.cli import ArgumentParser, add_trigger_arguments, run_main
from defense.data import DATASETS
from defense.scenario import model_file_scenario
from defense.triggers import TriggerConfig


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m defense.evaluate", description=__doc__)
    parser.add_argument("model", help="model file (.json manifest, .safetensors, or weights-only .pt)")
    parser.add_argument("--dataset", default="digits", choices=DATASETS.names())
    parser.add_argument("--data-dir", default=None, help="folder (or Parquet file) of a local data set")
    add_trigger_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    scenario = model_file_scenario(args.model, args.attack, TriggerConfig(args.trigger_size, args.blend_alpha),
                                   args.target, args.dataset, args.data_dir)
    metrics = scenario.evaluate(scenario.teacher)
    print(json.dumps({"model": str(args.model), "dataset": args.dataset, "attack": args.attack,
                      "trigger_size": args.trigger_size, "target": args.target, **metrics}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m defense.evaluate")
