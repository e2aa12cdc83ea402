"""Reproduce the DHBE quality figures: `python -m benchmarks.dhbe_table [--tiny] [--recipe R] [--set F=V ...] [--out STEM]`.

For each attack (3x3 BadNets patch, blended) and seed, a centrally poisoned small CNN on digits
16x16 is purified with a recipe (default `cpu`), with the same recipe without its regularisers
(distillation alone), and with the paper's ablation (lambda = 0, G adversarial again); `--variants`
picks some of them. Writes STEM.md and STEM.json (mean and spread over seeds; --out STEM, default
runs/bench/dhbe_table; the committed tables: --out benchmarks/results/dhbe_table...)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from defense.cli import ArgumentParser, run_main
from defense.dhbe import plain_adversarial_distillation, purify, smoke_sized, without_regularisers
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args
from defense.fileio import atomic_write_json, atomic_write_text
from benchmarks.tables import add_out_argument, cell, group_rows, out_file, out_stem
from defense.report import markdown_table
from defense.scenario import backdoored_scenario

KEYS = ("acc", "asr_x1", "asr_x4", "asr_x9")


def run(attacks: list[str], seeds: list[int], variants: dict, tiny: bool) -> list[dict]:
    rows = []
    for attack in attacks:
        for seed in seeds:
            scenario = backdoored_scenario(attack, 16, 3, seed=seed, epochs=3 if tiny else 30,
                                           cache=None if tiny else Path("runs/teachers"))
            before = scenario.evaluate(scenario.teacher)
            rows.append({"attack": attack, "seed": seed, "defence": "none (backdoored)", **before, "wall_s": 0.0})
            for name, config in variants.items():
                started = time.perf_counter()
                student, _ = purify(scenario.teacher, scenario.bundle.spec, config.replace(seed=seed))
                after = scenario.evaluate(student)
                rows.append({"attack": attack, "seed": seed, "defence": name, **after,
                             "wall_s": time.perf_counter() - started})
                print(json.dumps(rows[-1]), flush=True)
    return rows


VARIANTS = {  # key: (row label, config from the recipe)
    "dhbe": ("DHBE ({})", lambda recipe: recipe),
    "distillation": ("distillation alone (same recipe, lambda = 0)", without_regularisers),
    "plain": ("plain adversarial distillation (lambda = 0, adversarial G)", plain_adversarial_distillation),
}

HEADERS = {"acc": "ACC %", "asr_x1": "ASR x1 %", "asr_x4": "ASR x4 %", "asr_x9": "ASR x9 %",
           "acc_drop": "ACC drop (points)", "wall_s": "wall s"}


def summarise(rows: list[dict], first_column: str = "attack", keys: tuple[str, ...] = KEYS) -> str:
    columns = keys + ("wall_s",)
    lines = markdown_table([first_column, "defence", "seeds", *(HEADERS[k] for k in columns)],
                           [[attack, defence, len(members), *(cell(members, key, spread=True) for key in columns)]
                            for (attack, defence), members in group_rows(rows).items()])
    lines.append("")
    lines.append("mean ± half-range over seeds; ASR in the DHBE form; blended triggers have no x4/x9 form.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", choices=("badnets", "blended"), default=["badnets", "blended"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_recipe_arguments(parser)
    add_out_argument(parser, "dhbe_table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    if args.tiny:
        recipe = smoke_sized(recipe)
    label = ("CPU recipe" if args.recipe == "cpu" else f"{args.recipe} recipe") + "".join(
        f", {pair.replace('=', ' ')}" for pair in args.recipe_set)
    variants = {VARIANTS[key][0].format(label): VARIANTS[key][1](recipe) for key in args.variants}
    rows = run(args.attacks, list(range(1 if args.tiny else args.seeds)), variants, args.tiny)
    table = summarise(rows)
    print(table)
    if not args.tiny:
        stem = out_stem(args)
        atomic_write_json(out_file(stem, ".json"), {"recipe": recipe.to_dict(), "rows": rows})
        atomic_write_text(out_file(stem, ".md"), f"# DHBE ({label}) on digits 16x16 (small CNN)\n\n" + table + "\n")
        print(f"wrote {out_file(stem, '.md')} and .json")
    return 0


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.dhbe_table")
