"""What the data-free probes see on each case (the research behind the default's verdict): the
trigger bank's warm-up (Gp against T) and the blend search, run on the case's model alone; the
case's true attack is printed beside the evidence, never given to the probes.

    python -m benchmarks.evidence_probe [--cases dev|held-out] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.default_cases import DEV, HELD_OUT, plant
from defense.dhbe import recipe_config, scanned_trainer, smoke_sized
from defense.modelio import load_model


def probe(path: Path, recipe_name: str = "cpu-blend", tiny: bool = False) -> dict:
    loaded = load_model(path)
    recipe = smoke_sized(recipe_config(recipe_name)) if tiny else recipe_config(recipe_name)
    trainer = scanned_trainer(loaded.model.eval(), loaded.spec, recipe)
    started = time.perf_counter()
    for ext in trainer.extensions:
        ext.probe(trainer)
    evidence = {"probe_s": round(time.perf_counter() - started, 1)}
    bank = trainer.extension("trigger_bank")
    if bank is not None:
        evidence.update(bank.measure(trainer))
    search = trainer.extension("blend_search")
    if search is not None and search.evidence():
        found = search.evidence()
        index = found["anomaly_index"]
        top = max(range(len(index)), key=index.__getitem__)
        evidence.update(blend_top_class=found["classes"][top], blend_anomaly=round(index[top], 2),
                        blend_kept=found["kept"])
    return evidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", choices=("dev", "held-out"), default="dev")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--tiny", action="store_true", help="one case at smoke size (CI)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = DEV if args.cases == "dev" else HELD_OUT
    if args.tiny:
        cases = [DEV[2]]
    rows = []
    for case in cases:
        if args.only and case.name not in args.only:
            continue
        evidence = probe(plant(case, tiny=args.tiny), tiny=args.tiny)
        truth = {"attack": case.attack.attack if case.poisoned else "none",
                 "target": case.attack.target if case.poisoned else None}
        rows.append({"case": case.name, "truth": truth, **evidence})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
