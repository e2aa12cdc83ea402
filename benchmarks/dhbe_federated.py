"""DHBE on federated global models: `python -m benchmarks.dhbe_federated [--tiny]`.

Trains the main command's federation (`federated.simulate --malicious 2`: FedAvg, 10 clients, 2 of
them poisoning half their data with the 3x3 patch) for each federation seed, without purification,
then purifies its global model with the `cpu` and the `federated` recipes (defense.dhbe.RECIPES) for
each DHBE seed. Writes STEM.md and STEM.json (--out STEM, default runs/bench/dhbe_federated; the
committed tables: --out benchmarks/results/dhbe_federated...)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.dhbe_table import KEYS, summarise
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser, field_pairs
from defense.data import load_dataset
from defense.dhbe import RECIPES, purify, recipe_config, smoke_sized
from defense.fileio import atomic_write_json, atomic_write_text
from defense.scenario import model_file_scenario
from federated.config import SimulationConfig


def federated_global_model(seed: int, folder: Path, rounds: int) -> Path:
    from federated.engine import run_federated

    config = SimulationConfig(malicious=2, seed=seed, rounds=rounds)
    spec = load_dataset(config.dataset, None, config.image_size).spec
    run_federated(config, folder / f"federation-{seed}", spec, purify=False, quiet=True)
    return folder / f"federation-{seed}" / "final.json"


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--federations", type=int, default=2, help="federation seeds 0..N-1")
    parser.add_argument("--seeds", type=int, default=3, help="DHBE seeds 0..N-1")
    parser.add_argument("--recipes", nargs="+", default=["cpu", "federated"], choices=RECIPES.names())
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override fields of every recipe")
    add_out_argument(parser, "dhbe_federated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = field_pairs(args.set, "--set")
    label = f" with {' '.join(args.set)}" if args.set else ""
    recipes = {f"DHBE ({name} recipe{label})": recipe_config(name, overrides) for name in args.recipes}
    if args.tiny:
        recipes = {name: smoke_sized(recipe) for name, recipe in recipes.items()}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for federation in range(1 if args.tiny else args.federations):
            path = federated_global_model(federation, Path(folder), rounds=2 if args.tiny else 20)
            scenario = model_file_scenario(path)  # the run's experiment record: its trigger and target
            model = f"FedAvg global model, federation seed {federation}"
            before = scenario.evaluate(scenario.teacher)
            rows.append({"attack": model, "seed": 0, "defence": "none (backdoored)", **before, "acc_drop": 0.0,
                         "wall_s": 0.0})
            for name, recipe in recipes.items():
                for seed in range(1 if args.tiny else args.seeds):
                    started = time.perf_counter()
                    student, _ = purify(scenario.teacher, scenario.bundle.spec, recipe.replace(seed=seed))
                    after = scenario.evaluate(student)
                    rows.append({"attack": model, "seed": seed, "defence": name, **after,
                                 "acc_drop": before["acc"] - after["acc"], "wall_s": time.perf_counter() - started})
                    print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows, first_column="global model", keys=KEYS + ("acc_drop",))
    print(table)
    if not args.tiny:
        recipes_used = {name: recipe.to_dict() for name, recipe in recipes.items()}
        stem = out_stem(args)
        atomic_write_json(out_file(stem, ".json"), {"recipes": recipes_used, "rows": rows})
        atomic_write_text(out_file(stem, ".md"), "# DHBE on federated global models (digits 16x16, small CNN)\n\n"
                          + table + "\n")
        print(f"wrote {out_file(stem, '.md')} and .json")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.dhbe_federated")   # a bad --set value: one line, exit 2
