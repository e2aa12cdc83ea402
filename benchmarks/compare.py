"""Every defence on the same backdoored models: `python -m benchmarks.compare [--tiny]`.

Attacks: 3x3 BadNets patch, blended, SIG on digits 16x16 (small CNN); seeds 0..N-1. Data-needing
defences get the server a clean set of --per-class samples per class from the training split.
Writes STEM.md and STEM.json (like the paper's Tables 3 and 6; --out STEM, default runs/bench/compare;
the committed table: --out benchmarks/results/compare)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from defense.report import markdown_table
from benchmarks.tables import add_out_argument, cell, group_rows, out_file, out_stem
from defense.baselines import DEFENCES, DefenceConfig, clean_subset, defend
from defense.dhbe import cpu_recipe
from defense.fileio import atomic_write_json, atomic_write_text
from defense.metrics import defence_effectiveness_rating
from defense.scenario import backdoored_scenario
from defense.cli import ArgumentParser

KEYS = ("acc", "asr_x1", "asr_x4", "asr_x9", "ra", "der", "wall_s")


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10, help="clean samples per class for data-needing defences")
    parser.add_argument("--defences", nargs="*", default=DEFENCES.names())
    add_out_argument(parser, "compare")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = DefenceConfig()
    if args.tiny:
        config = DefenceConfig(dhbe=cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16),
                               finetune_epochs=1, nft_iterations=2)
    rows = []
    for attack in ("badnets", "blended", "sig"):
        for seed in range(1 if args.tiny else args.seeds):
            scenario = backdoored_scenario(attack, 16, 3, seed=seed, epochs=3 if args.tiny else 30,
                                           cache=None if args.tiny else Path("runs/teachers"))
            clean = clean_subset(scenario.bundle.train, args.per_class, seed)
            before = scenario.evaluate(scenario.teacher)
            rows.append({"attack": attack, "seed": seed, "defence": "none", "clean_budget": 0, **before, "wall_s": 0.0})
            for name in args.defences:
                started = time.perf_counter()
                model = defend(name, scenario.teacher, scenario.bundle.spec, clean, replace(config, seed=seed))
                wall = time.perf_counter() - started
                after = scenario.evaluate(model)
                budget = len(clean) if DEFENCES.get(name).needs_clean_data else 0
                rows.append({"attack": attack, "seed": seed, "defence": name, "clean_budget": budget, **after,
                             "der": defence_effectiveness_rating(before, after), "wall_s": wall})
                print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows, args.per_class)
    print(table)
    if not args.tiny:
        stem = out_stem(args)
        atomic_write_json(out_file(stem, ".json"), rows)
        atomic_write_text(out_file(stem, ".md"), "# Defences side by side (digits 16x16, small CNN)\n\n"
                          + table + "\n")
        print(f"wrote {out_file(stem, '.md')} and .json")


def summarise(rows: list[dict], per_class: int) -> str:
    table = []
    for (attack, defence), members in group_rows(rows).items():
        budget = "none" if members[0]["clean_budget"] == 0 else f"{per_class}/class ({members[0]['clean_budget']})"
        table.append([attack, defence, budget, *(cell(members, key) for key in KEYS)])
    lines = markdown_table(["attack", "defence", "clean data", "ACC %", "ASR x1 %", "ASR x4 %", "ASR x9 %", "RA %",
                            "DER", "wall s"], table)
    lines.append("")
    lines.append(f"Means over {len(set(r['seed'] for r in rows))} seed(s). ASR in the DHBE form. DER = "
                 "(max(0, dASR) - max(0, dACC) + 1) / 2. Blended and SIG triggers have no x4/x9 form.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
