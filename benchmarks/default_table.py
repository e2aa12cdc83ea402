"""The one default purification on the measured cases: `python -m benchmarks.default_table
[--cases dev|held-out] [--recipe default] [--tiny]`.

Every case model is planted once (benchmarks/default_cases.py, runs/cases/) with its experiment
record; the purification gets the model and its input spec only, through the same recipe
constructor as the CLIs (`recipe_config`), in-process (DHBE's own time, without Ray Train's fixed
cost); the experimenter then measures ACC/ASR with the record's trigger, also after re-estimating the
purified model's batch-norm statistics on the clean training images (what a user's AdaBN or fine-tune
would do; an erasure that lives in the statistics does not survive it: docs/research/dhbe-log.md, fifteenth round). Writes
STEM.parquet and STEM.md (--out STEM; default runs/bench/default_table_<cases>; the committed tables:
--out benchmarks/results/default_table_<cases>). A run with no case (an --only naming none) writes nothing."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.default_cases import CASE_SETS, DEV, history_models, plant
from defense.dhbe import DHBETrainer, recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.fileio import atomic_path, atomic_write_text
from defense.metrics import statistics_refitted
from defense.modelio import load_model
from defense.report import markdown_table
from defense.scan import scan
from defense.scenario import model_file_scenario
from benchmarks.tables import add_out_argument, out_file, out_stem
from defense.cli import ArgumentParser
from defense.errors import ConfigError


def forced_report(model, spec, recipe, earlier):
    """A false alarm on purpose: the scan's own highest-scoring class named a suspect, with the trigger
    the scan inverted for it, whatever its score (the cost of the game on a model the scan would clear)."""
    found = scan(model, spec, earlier, replace(recipe.scan, threshold=1e-9))
    return replace(found, backdoored=True, suspects=found.suspects[:1], triggers=found.triggers[:1])


def purify_model_file(path: Path, recipe_name: str, tiny: bool, overrides: dict, earlier: tuple[Path, ...] = (),
                      force_game: bool = False) -> dict:
    """One purification of a model file in-process (DHBE's own time), measured by the experimenter with
    the file's experiment record: before, after, the trainer's evidence and DHBE's wall time.
    `earlier`: model files of earlier versions (a federated run's earlier global models). `force_game`:
    the game is played on the scan's highest-scoring class even when the scan clears the model."""
    scenario = model_file_scenario(path)
    before = scenario.evaluate(scenario.teacher)
    recipe = recipe_config(recipe_name, overrides)
    if tiny:
        recipe = smoke_sized(recipe)
    versions = [load_model(p).model.eval() for p in earlier]
    started = time.perf_counter()
    if force_game:
        report = forced_report(scenario.teacher, scenario.bundle.spec, recipe, versions)
        trainer = DHBETrainer(scenario.teacher, scenario.bundle.spec, recipe, scan=report)
    else:
        trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe, earlier=versions)
    train_epochs(trainer)
    wall = time.perf_counter() - started
    output = trainer.output_model().eval()
    after = scenario.evaluate(output)
    refit = scenario.evaluate(statistics_refitted(output, scenario.bundle.train.images))
    return {"before": before, "after": after, "after_refit": refit, "evidence": trainer.evidence(), "wall_s": wall,
            "epochs": trainer.epoch}


def case_model(case, tiny: bool, history: bool) -> tuple[Path, tuple[Path, ...]]:
    """The case's model file, and with `history` a federated case's earlier global models as the
    simulation's purification hook picks them (rounds 5, 10, 15 of 20)."""
    if not history or case.kind == "central" or tiny:
        return plant(case, tiny=tiny), ()
    final, earlier = history_models(case)
    return final, tuple(earlier)


def run_case(case, recipe_name: str, tiny: bool, overrides: dict, history: bool = True, force_game: bool = False) -> dict:
    model, earlier = case_model(case, tiny, history)
    result = purify_model_file(model, recipe_name, tiny, overrides, earlier, force_game)
    before, after, evidence, wall = result["before"], result["after"], result["evidence"], result["wall_s"]
    verdict = evidence.get("verdict", {})
    pct = lambda v: None if v is None else round(100 * v, 1)
    return {"case": case.name, "attack": case.attack.attack if case.poisoned else "none", "kind": case.kind,
            "target": case.attack.target if case.poisoned else None,
            "acc_before": pct(before["acc"]), "acc_after": pct(after["acc"]),
            "acc_drop": round(100 * (before["acc"] - after["acc"]), 2),
            **{f"{k}_before": pct(before.get(k)) for k in ("asr_x1", "asr_x9")},
            **{f"{k}_after": pct(after.get(k)) for k in ("asr_x1", "asr_x4", "asr_x9", "ra")},
            **{f"{k}_after_refit": pct(result["after_refit"].get(k)) for k in ("acc", "asr_x1", "asr_x9")},
            "versions": 1 + len(earlier),
            "suspected": ",".join(map(str, verdict.get("suspected_targets", []))) or "none",
            "max_anomaly": round((evidence.get("scan") or {}).get("score") or 0.0, 2),
            "earlier_max_anomaly": ",".join(f"{max(v['score']):.2f}"
                                            for v in (evidence.get("scan") or {}).get("per_version", [])[:-1]),
            "stopped": bool(evidence.get("stopped")), "guard": verdict.get("guard", ""),
            "epochs": result["epochs"], "wall_s": round(wall, 1)}


COLUMNS = [("case", "case"), ("attack", "attack"), ("kind", "model"), ("target", "target"),
           ("acc_before", "ACC before"), ("acc_after", "ACC after"), ("acc_drop", "drop"),
           ("asr_x1_before", "ASR x1 before"), ("asr_x1_after", "ASR x1"), ("asr_x4_after", "x4"),
           ("asr_x9_after", "x9"), ("ra_after", "RA"), ("asr_x1_after_refit", "x1 after a clean BN refit"),
           ("asr_x9_after_refit", "x9 after it"), ("versions", "versions"), ("suspected", "suspected target"),
           ("max_anomaly", "scan score"), ("earlier_max_anomaly", "earlier versions' scan scores"), ("wall_s", "wall s")]


def markdown(rows: list[dict]) -> str:
    return "\n".join(markdown_table([label for _, label in COLUMNS], [[row.get(key) for key, _ in COLUMNS] for row in rows]))


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--cases", choices=tuple(CASE_SETS), default="dev")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    add_out_argument(parser, "default_table_<cases>", (".parquet", ".md"))
    parser.add_argument("--tiny", action="store_true", help="two cases at smoke size (CI)")
    parser.add_argument("--force-game", action="store_true",
                        help="play the game on the scan's highest-scoring class even where it finds no backdoor "
                             "(the cost of a false alarm)")
    parser.add_argument("--no-history", action="store_true",
                        help="purify federated cases without their earlier global models (the eleventh round's verdict)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from defense.cli import field_pairs

    overrides = field_pairs(args.set, "--set")
    if args.force_game and recipe_config(args.recipe, overrides).scan is None:
        parser.error(f"--force-game needs a recipe with a scan; {args.recipe} has none")
    cases = CASE_SETS[args.cases]
    if args.only is not None:
        cases = [c for c in cases if c.name in args.only]
    if args.tiny:
        cases = [DEV[0], DEV[2]]
    if not cases:
        raise ConfigError(f"--only {' '.join(args.only) or '(no names)'}: no case of --cases {args.cases} has that name "
                          "(benchmarks/default_cases.py); nothing run, nothing written")
    rows = []
    for case in cases:
        rows.append(run_case(case, args.recipe, args.tiny, overrides, not args.no_history, args.force_game))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if not args.tiny:
        import pandas as pd

        stem = out_stem(args, f"default_table_{args.cases.replace('-', '_')}")
        with atomic_path(out_file(stem, ".parquet")) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
        settings = ((f" --set {' '.join(args.set)}" if args.set else "") + (" --no-history" if args.no_history else "")
                    + (" --force-game" if args.force_game else "") + (f" --only {' '.join(args.only)}" if args.only else ""))
        atomic_write_text(out_file(stem, ".md"), f"# `{args.recipe}` purification, {args.cases} cases "
                          f"(`python -m benchmarks.default_table --cases {args.cases}{settings}`)\n\n" + table + "\n")
        print(f"wrote {out_file(stem, '.md')} and .parquet")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.default_table")   # a bad --set value: one line, exit 2
