"""The attack x in-training defence x purification matrix:

    python -m benchmarks.defence_matrix [--attacks ...] [--aggregations ...] [--seeds N] [--no-purify] [--out STEM] [--tiny]

Each cell is one federated run through the project's engine (Flower's simulation, Ray backend; 10
clients, 20 rounds, attackers poison in rounds 1..15 so the backdoor's lifespan after the attack is
measured in the last 5), then, unless --no-purify, the default data-free purification of the final
global model, in-process (DHBE's own time), measured by the experimenter with the run's experiment
record; as in the simulation's purification hook, the verdict also weighs the run's global models of
rounds 5, 10 and 15. A cell whose global model carries no backdoor (ASR x1 < 50%) is not purified; its purified row
says `skipped: no backdoor`, it is not dropped.

Writes STEM.parquet (one row per attack, aggregation, seed and purified), STEM.md and STEM.png (ASR x1
heatmaps before and after purification); STEM is --out, default runs/bench/defence_matrix (the committed
table: --out benchmarks/results/defence_matrix).
DER is reported in both ASR forms: `der_all` from BackdoorBench's (asr_all_x1: every non-target test
image), the form BackdoorBench's tables use, and `der` from DHBE's (asr_x1: those the model gets
right when clean)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.default_cases import MATRIX_ATTACKS, cell_config, earlier_model_files
from defense.fileio import atomic_path, atomic_write_text
from defense.metrics import defence_effectiveness_rating
from defense.report import figure, markdown_table
from benchmarks.tables import BENCH_RUNS, COMMITTED, add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser

RESULTS = COMMITTED

AGGREGATIONS = ("fedavg", "multikrum", "median", "trimmed-mean", "clip", "flame", "foolsgold", "rlr")
EXCLUDING = ("flame", "foolsgold")   # in-training defences that give some updates no weight
ALIVE = 0.5   # a global model with ASR x1 below this carries no backdoor to purify


def run_cell(attack: str, aggregation: str, seed: int, purify: bool, tiny: bool, recipe: str) -> list[dict]:
    from defense.data import load_dataset
    from federated.engine import run_federated

    config = cell_config(attack, aggregation, seed, tiny)
    spec = load_dataset(config.dataset, None, config.image_size).spec
    key = {"attack": attack, "aggregation": aggregation, "seed": seed}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run = run_federated(config, Path(folder) / "run", spec, purify=False, quiet=True)
        wall = time.perf_counter() - started
        if not run.complete:
            return [{**key, "purified": False, "status": f"incomplete: {run.failure}", "wall_s": round(wall, 1)}]
        last = run.rows[-1]
        excluded = sum(r.get("malicious_excluded") or 0 for r in run.rows)
        attacked = sum(r.get("malicious_clients") or 0 for r in run.rows)
        trained = {**key, "purified": False, "status": "trained", "acc": last["acc"], "asr_x1": last["asr_x1"],
                   "asr_x9": last.get("asr_x9"), "asr_all_x1": last.get("asr_all_x1"),
                   "lifespan": last.get("lifespan_rounds"), "lifespan_censored": last.get("lifespan_censored"),
                   # of the attackers' accepted updates, the share the in-training defence gave no weight
                   "malicious_excluded_share": excluded / attacked if attacked and aggregation in EXCLUDING else None,
                   "der": None, "der_all": None, "wall_s": round(wall, 1)}
        rows = [trained]
        if not purify:
            return rows
        # at smoke size (CI) no backdoor takes hold, so the FedAvg cells are purified anyway: the path is run
        alive = 0.0 if tiny and aggregation == "fedavg" else ALIVE
        if last["asr_x1"] is None or last["asr_x1"] < alive:
            rows.append({**key, "purified": True, "status": "skipped: no backdoor (ASR x1 < 50%)", "wall_s": 0.0})
            return rows
        from benchmarks.default_table import purify_model_file

        # as the simulation's purification hook does: the verdict also weighs the run's earlier global models
        earlier = tuple(earlier_model_files(Path(folder) / "run", config.rounds))
        result = purify_model_file(Path(folder) / "run" / "final.json", recipe, tiny, {}, earlier)
        before, after = result["before"], result["after"]
        verdict = result["evidence"].get("verdict", {})
        suspects = ",".join(map(str, verdict.get("suspected_targets", []))) or "none"
        rows.append({**key, "purified": True, "status": f"purified (suspects {suspects})"
                     if verdict.get("backdoor_suspected", True) else "handed back: no backdoor found",
                     "suspects": suspects, "acc": after["acc"], "asr_x1": after["asr_x1"],
                     "asr_x9": after.get("asr_x9"), "asr_all_x1": after.get("asr_all_x1"),
                     "der": defence_effectiveness_rating(before, after),
                     "der_all": defence_effectiveness_rating(before, after, "asr_all_x1"),
                     "wall_s": round(result["wall_s"], 1)})
        return rows


COLUMNS = ["attack", "aggregation", "seed", "purified", "status", "suspects", "acc", "asr_x1", "asr_x9", "asr_all_x1",
           "lifespan", "lifespan_censored", "malicious_excluded_share", "der", "der_all", "wall_s"]


def pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:.1f}"


def markdown(rows: list[dict]) -> str:
    def lifespan(row):
        if row.get("lifespan") is None:
            return None
        return f">= {row['lifespan']}" if row.get("lifespan_censored") else str(row["lifespan"])

    lines = markdown_table(
        ["attack", "aggregation", "seed", "purified", "ACC %", "ASR x1 %", "ASR x9 %", "ASR all x1 %", "lifespan",
         "DER (all)", "wall s", "status"],
        [[r["attack"], r["aggregation"], r["seed"], "yes" if r["purified"] else "no", pct(r.get("acc")),
          pct(r.get("asr_x1")), pct(r.get("asr_x9")), pct(r.get("asr_all_x1")), lifespan(r),
          None if r.get("der_all") is None else f"{r['der_all']:.3f}", r.get("wall_s"), r.get("status")]
         for r in rows])
    return "\n".join(lines)


def heatmap(rows: list[dict], attacks: list[str], aggregations: list[str], path: Path) -> None:
    """ASR x1 heatmaps: after training, and (where purified rows exist) after purification. A cell
    reads `skip` where the purification was skipped (no backdoor), `n/a` where ASR is undefined."""
    import numpy as np

    panels_wanted = [False] + ([True] if any(r["purified"] for r in rows) else [])
    with figure(path, figsize=(1.5 + 0.75 * len(aggregations) * len(panels_wanted), 1.2 + 0.6 * len(attacks))) as ax:
        fig = ax.figure
        fig.clf()
        axes = np.atleast_1d(fig.subplots(1, len(panels_wanted) + 1,
                                          gridspec_kw={"width_ratios": [1.0] * len(panels_wanted) + [0.04]}))
        panels, bar_axis = axes[:-1], axes[-1]
        for ax, purified in zip(panels, panels_wanted):
            grid = np.full((len(attacks), len(aggregations)), np.nan)
            labels = np.full(grid.shape, "", dtype=object)
            for r in rows:
                if r["purified"] != purified or r["attack"] not in attacks or r["aggregation"] not in aggregations:
                    continue
                i, j = attacks.index(r["attack"]), aggregations.index(r["aggregation"])
                if r.get("asr_x1") is not None and r["asr_x1"] == r["asr_x1"]:
                    grid[i, j], labels[i, j] = 100 * r["asr_x1"], f"{100 * r['asr_x1']:.0f}"
                else:
                    labels[i, j] = "skip" if str(r.get("status", "")).startswith("skipped") else "n/a"
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="Reds")
            for (i, j), label in np.ndenumerate(labels):   # white on dark cells, black on light ones
                dark = grid[i, j] == grid[i, j] and grid[i, j] > 55
                ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if dark else "black")
            ax.set_xticks(range(len(aggregations)), aggregations, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(attacks)), attacks, fontsize=7)
            ax.set_title(f"ASR x1 % {'after purification' if purified else 'after training'}", fontsize=8)
        fig.colorbar(image, cax=bar_axis, label="ASR x1 %")


def redraw(stem: str = "defence_matrix", out: Optional[Path] = None) -> Path:
    """The heatmap again from a committed table, benchmarks/results/STEM.parquet, drawn into OUT.png (default
    runs/bench/STEM.png; out=Path("benchmarks/results/STEM") redraws the committed one):
    `python -c 'from benchmarks.defence_matrix import redraw; redraw()'`."""
    import pandas as pd

    table = pd.read_parquet(out_file(RESULTS / stem, ".parquet"))
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in table.to_dict("records")]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    aggregations = list(dict.fromkeys(r["aggregation"] for r in rows))
    path = out_file(out if out is not None else BENCH_RUNS / stem, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap(rows, attacks, aggregations, path)
    return path


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=list(MATRIX_ATTACKS), choices=list(MATRIX_ATTACKS))
    parser.add_argument("--aggregations", nargs="+", default=list(AGGREGATIONS), choices=list(AGGREGATIONS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (seed s also sets target s mod 10)")
    parser.add_argument("--no-purify", action="store_true", help="only the trained models (no purified rows)")
    parser.add_argument("--recipe", default="default", help="the purification's recipe")
    add_out_argument(parser, "defence_matrix", (".parquet", ".md", ".png"))
    parser.add_argument("--tiny", action="store_true", help="3 attacks x 2 aggregations at smoke size (CI), not written")
    args = parser.parse_args()
    if not 1 <= args.seeds <= 10:
        parser.error(f"--seeds must be in 1..10, got {args.seeds}")
    torch.set_num_threads(2)
    attacks, aggregations = args.attacks, args.aggregations
    if args.tiny:
        attacks, aggregations = ["badnets", "neurotoxin", "a3fl"], ["fedavg", "flame"]
    rows, started = [], time.perf_counter()
    for seed in range(args.seeds):
        for attack in attacks:
            for aggregation in aggregations:
                for row in run_cell(attack, aggregation, seed, not args.no_purify, args.tiny, args.recipe):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    total = time.perf_counter() - started
    table = markdown(rows)
    print(table)
    print(f"matrix wall time: {total:.0f} s")
    if args.tiny:
        return
    import pandas as pd

    stem = out_stem(args)
    with atomic_path(out_file(stem, ".parquet")) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp, index=False)
    heatmap(rows, attacks, aggregations, out_file(stem, ".png"))
    command = " ".join(["python -m benchmarks.defence_matrix", *sys.argv[1:]])
    atomic_write_text(out_file(stem, ".md"), f"# Attack x defence x purification (`{command}`)\n\n"
                      f"{len(rows)} rows, {args.seeds} seed(s), wall time {total:.0f} s on this machine.\n\n"
                      f"![ASR x1 heatmaps]({stem.name}.png)\n\n" + table + "\n")
    print(f"wrote {out_file(stem, '.md')}, .parquet and .png")


if __name__ == "__main__":
    main()
