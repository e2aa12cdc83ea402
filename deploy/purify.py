"""`python -m deploy.purify MODEL --out OUT`: purify any model file of the project with DHBE on
Ray Train (a fresh local Ray, or the cluster named by RAY_ADDRESS / --address)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from defense.cli import ArgumentParser, non_negative_int, positive_float, positive_int, run_main
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args
from defense.errors import ConfigError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m deploy.purify", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model file to purify (.json manifest, .safetensors, or weights-only .pt)")
    p.add_argument("--out", required=True, help="output model path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (data-parallel when > 1)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_true", default=None, help="force GPU workers")
    device.add_argument("--cpu", dest="use_gpu", action="store_false", help="force CPU workers")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", default=None, help="folder for Ray Train checkpoints (default: temporary)")
    p.add_argument("--name", default=None, help="run name; reusing one resumes that run")
    p.add_argument("--max-failures", type=non_negative_int, default=2, help="worker failures to recover from")
    p.add_argument("--budget", type=positive_float, default=None, help="stop after this many seconds of DHBE")
    add_recipe_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from defense.modelio import load_model

    recipe = recipe_from_args(args)
    teacher = load_model(args.model)
    recipe.validate_for(teacher.spec)
    out = Path(args.out)
    if out.suffix in (".json", ".safetensors"):
        out = out.with_suffix("")
    if out.with_suffix(".json").exists():
        raise ConfigError(f"--out {out}.json already exists")
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    job = PurifyJobConfig(recipe=recipe, workers=args.workers, use_gpu=args.use_gpu, address=args.address,
                          storage_path=args.storage, name=args.name, max_failures=args.max_failures,
                          budget_s=args.budget)
    result = run_purify_job(teacher, job, out)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"purified": str(result.manifest_path), "device": result.device, "wall_s": round(result.wall_s, 1),
                      "epochs": len(result.history),
                      "synthetic_agreement": last.get("synthetic_agreement"),
                      "trigger_sensitivity": last.get("trigger_sensitivity"), "evidence": result.evidence}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m deploy.purify")
