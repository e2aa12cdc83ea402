"""Fingerprints of each DHBE recipe: per-epoch losses and diagnostics and a SHA-256 of the model
handed back, on a fixed random teacher at a small size (4 epochs x 3 iterations, batch 32). Used to
show that a refactoring changed no maths: `python tests/helpers/recipe_fingerprints.py --check FILE`
compares against a stored run (bit for bit, same machine and torch build).

    python tests/helpers/recipe_fingerprints.py [--out FILE] [--check FILE] [--tiny]
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from defense.dhbe import DHBETrainer, recipe_config
from defense.fileio import atomic_write_json
from defense.models import build_model
from defense.spec import InputSpec
from defense.cli import ArgumentParser

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
SMALL = {"epochs": 4, "iters_per_epoch": 3, "batch_size": 32, "perturbations.warmup_steps": 20,
         "perturbations.bank_size": 200}
CASES = {  # name -> (recipe, overrides, epochs run)
    "cpu": ("cpu", SMALL, 4),
    "federated": ("federated", SMALL, 4),
    "cpu+sample_pool": ("cpu", {**SMALL, "sample_pool.capacity": 96}, 4),
    "official": ("official", {"batch_size": 8, "epochs": 2, "iters_per_epoch": 1}, 2),
}


def fingerprint(recipe_name: str, overrides: dict, epochs: int) -> dict:
    torch.manual_seed(123)
    teacher = build_model("small-cnn", SPEC).eval()
    trainer = DHBETrainer(teacher, SPEC, recipe_config(recipe_name, overrides))
    rows = []
    while trainer.epoch < epochs:
        r = trainer.run_epoch()
        rows.append([r.loss_student, r.loss_distill, r.loss_regulariser, r.synthetic_agreement,
                     r.trigger_sensitivity, r.trigger_flip_rate, r.teacher_flip_rate])
    digest = hashlib.sha256()
    for key, value in trainer.output_model().state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {"rows": rows, "sha": digest.hexdigest()}


def main() -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write the fingerprints here (JSON)")
    parser.add_argument("--check", default=None, help="compare with a stored run; exit 1 on any difference")
    parser.add_argument("--tiny", action="store_true", help="only the official case (CI smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = {"official": CASES["official"]} if args.tiny else CASES
    found = {name: fingerprint(*case) for name, case in cases.items()}
    for name, result in found.items():
        print(f"{name:16s} {result['sha'][:16]}  final loss {result['rows'][-1][0]:.9f}")
    if args.out:
        atomic_write_json(Path(args.out), found)
    if args.check:
        stored = json.loads(Path(args.check).read_text())
        differ = [name for name in found if stored.get(name) != found[name]]
        print("identical to " + args.check if not differ else f"differ from {args.check}: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
