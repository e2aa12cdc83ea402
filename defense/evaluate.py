"""`python -m defense.evaluate MODEL --dataset NAME --attack KIND ...`: ACC/ASR of any model file
as one JSON line (the experimenter's measuring stick; uses the test set and the true trigger)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from defense.cli import ArgumentParser, add_trigger_arguments, run_main
from defense.data import DATASETS, load_dataset
from defense.errors import ConfigError
from defense.modelio import load_model
from defense.triggers import TriggerConfig, make_trigger
from defense.metrics import evaluate_backdoor


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m defense.evaluate", description=__doc__)
    parser.add_argument("model", help="model file (.json manifest, .safetensors, or weights-only .pt)")
    parser.add_argument("--dataset", default="digits", choices=DATASETS.names())
    parser.add_argument("--data-dir", default=None, help="folder (or Parquet file) of a local data set")
    add_trigger_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_model(args.model)
    spec = loaded.spec
    bundle = load_dataset(args.dataset, args.data_dir, image_size=spec.height)
    if bundle.spec.shape != spec.shape or bundle.spec.num_classes != spec.num_classes:
        raise ConfigError(f"model expects {spec.shape} inputs and {spec.num_classes} classes; "
                          f"data set {args.dataset!r} gives {bundle.spec.shape} and {bundle.spec.num_classes}")
    if not 0 <= args.target < spec.num_classes:
        raise ConfigError(f"--target must be in 0..{spec.num_classes - 1}, got {args.target}")
    trigger = make_trigger(args.attack, spec, TriggerConfig(args.trigger_size, args.blend_alpha))
    metrics = evaluate_backdoor(loaded.model, bundle.test, trigger, args.target)
    print(json.dumps({"model": str(args.model), "dataset": args.dataset, "attack": args.attack,
                      "trigger_size": args.trigger_size, "target": args.target, **metrics}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m defense.evaluate")
