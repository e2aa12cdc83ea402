"""`python -m deploy.purify MODEL --out OUT`: purify any model file of the project with DHBE on
Ray Train (a fresh local Ray, or the cluster named by RAY_ADDRESS / --address)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Sequence

from defense.cli import ArgumentParser, field_pairs, non_negative_int, positive_float, positive_int, run_main
from defense.dhbe import RECIPES, DHBEConfig
from defense.errors import ConfigError

def add_dhbe_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DHBE configuration")
    group.add_argument("--recipe", choices=RECIPES.names(), default="cpu",
                       help="cpu: the project's small-scale recipe; federated: the same for a FedAvg global "
                            "model (docs/dhbe.md); official: the paper's defaults")
    group.add_argument("--config", default=None, help="JSON file of DHBEConfig fields (applied after --recipe)")
    group.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                       help="override DHBEConfig fields, e.g. --set lam=0.5 epochs=10")


def dhbe_config_from_args(args: argparse.Namespace) -> DHBEConfig:
    config = RECIPES.get(args.recipe)()
    overrides: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist")
        try:
            overrides.update(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path} is not valid JSON: {exc.msg}") from None
    overrides.update(field_pairs(args.set, "--set"))
    return replace(config, **coerce_fields(overrides))


def coerce_fields(values: dict) -> dict:
    """Convert strings/JSON values to DHBEConfig field types; unknown fields are a ConfigError."""
    defaults = DHBEConfig()
    known = {f.name for f in fields(DHBEConfig)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown DHBE field {key!r}; known: {', '.join(sorted(known))}")
        current = getattr(defaults, key)
        try:
            if isinstance(current, bool):
                out[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            elif current is None:  # an optional number: "none" keeps it unset
                out[key] = None if value is None or str(value).lower() == "none" else float(value)
            elif isinstance(current, tuple):
                items = value if isinstance(value, (list, tuple)) else str(value).split(",")
                out[key] = tuple(float(v) for v in items if str(v) != "")
            else:
                out[key] = type(current)(value)
        except (TypeError, ValueError):
            expected = "number" if current is None else type(current).__name__
            raise ConfigError(f"DHBE field {key} expects a {expected}, got {value!r}") from None
    return out


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
    add_dhbe_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from defense.modelio import load_model

    teacher = load_model(args.model)
    config = dhbe_config_from_args(args)
    config.validate_for(teacher.spec)
    out = Path(args.out)
    if out.suffix in (".json", ".safetensors"):
        out = out.with_suffix("")
    if out.with_suffix(".json").exists():
        raise ConfigError(f"--out {out}.json already exists")
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    job = PurifyJobConfig(dhbe=config, workers=args.workers, use_gpu=args.use_gpu, address=args.address,
                          storage_path=args.storage, name=args.name, max_failures=args.max_failures,
                          budget_s=args.budget)
    result = run_purify_job(teacher, job, out)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"purified": str(result.manifest_path), "device": result.device, "wall_s": round(result.wall_s, 1),
                      "epochs": len(result.history),
                      "synthetic_agreement": last.get("synthetic_agreement"),
                      "trigger_sensitivity": last.get("trigger_sensitivity")}))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m deploy.purify")
