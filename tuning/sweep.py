"""`python -m tuning.sweep MODEL --preset lambda`: Ray Tune ablations of DHBE on a backdoored model.

Each trial (tuning/trial.py) runs the same DHBE job body as deploy/ (`deploy.ray_job.run_dhbe_loop`). ASHA stops trials
early by a data-free defender score (synthetic agreement minus trigger flip rate): a defender has no
test ASR. The experimenter's test ACC/ASR are reported beside it (`eval_*` columns); any selection by
them is printed as "oracle"."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from defense.cli import ArgumentParser, add_trigger_arguments, bounded_int, positive_int, run_main, writable_destination
from defense.data import DATASETS
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args
from defense.errors import ConfigError

PRESETS = {
    "lambda": {"lam": [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]},
    "lr": {"student_lr": [0.01, 0.02, 0.05, 0.1, 0.2]},
    "patch-size": {"patch_size": [3, 5, 7], "trigger_size": [3, 5, 7]},
    "grid": {"lam": [0.1, 0.5, 1.0], "student_lr": [0.01, 0.05]},
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m tuning.sweep", description=__doc__)
    p.add_argument("model", nargs="?", default=None,
                   help="backdoored model file (not needed for --preset patch-size, which plants its own)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="lambda",
                   help="what is swept: " + "; ".join(f"{name}: {', '.join(f'{k} {v}' for k, v in grid.items())}"
                                                      for name, grid in PRESETS.items()))
    p.add_argument("--samples", type=bounded_int(1, 1000), default=1, help="repeats (seeds) of every grid point")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                   help="asha: stop weak trials early by the data-free defender score; none: run every trial to the end")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (Tune storage, tables, plots)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="SWEEP_FOLDER",
                   help="continue an interrupted sweep: the folder given, else --out (as federated.simulate --resume)")
    p.add_argument("--dataset", default=None, choices=DATASETS.names(),
                   help="evaluation data (oracle only; default: the model file's experiment record)")
    p.add_argument("--data-dir", default=None, help="folder of a local data set (for --dataset other than digits)")
    p.add_argument("--image-size", type=positive_int, default=16, help="for teachers planted by the preset")
    p.add_argument("--max-concurrent", type=bounded_int(1, 1024), default=None, help="trials at once (default: the cluster's CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress table while the trials run")
    add_trigger_arguments(p, from_record=True)
    add_recipe_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None, trainable: Optional[Callable[[dict], None]] = None) -> int:
    """`trainable`: the trial body (default tuning.trial.trial; tests pass one that plants a fault)."""
    args = build_parser().parse_args(argv)
    base = recipe_from_args(args)
    if args.preset != "patch-size":
        if not args.model:
            raise ConfigError(f"--preset {args.preset} needs a MODEL file")
        if not Path(args.model).exists():
            raise ConfigError(f"model file {args.model} does not exist")
    if isinstance(args.resume, str):
        args.out = args.resume
    out = Path(args.out).resolve()
    writable_destination(out / "sweep")
    if args.resume and not (out / "sweep").exists():
        raise ConfigError(f"--resume: no sweep to resume in {out}")
    if not args.resume and (out / "sweep").exists():
        raise ConfigError(f"{out} already holds a sweep; pass --resume or another --out")
    from tuning.runner import SweepIncomplete, SweepInterrupted, run_sweep
    from tuning.trial import evaluation_scenario, trial

    setup = {"model": str(Path(args.model).resolve()) if args.model else None, "attack": args.attack,
             "trigger_size": args.trigger_size, "target": args.target, "dataset": args.dataset,
             "blend_alpha": args.blend_alpha, "place": args.trigger_place, "pattern": args.trigger_pattern,
             "data_dir": args.data_dir, "image_size": args.image_size, "seed": base.dhbe.seed,
             "base": base.to_dict(), "out": str(out), "cache": str(out / "teachers")}
    if args.model:   # the model, its experiment record and the flags over it, checked once here, not in every trial
        evaluation_scenario(setup, args.trigger_size)
    out.mkdir(parents=True, exist_ok=True)
    try:
        table = run_sweep(setup, PRESETS[args.preset], args.samples, args.scheduler, out, args.resume,
                          args.max_concurrent, trainable or trial, args.quiet)
    except SweepInterrupted as exc:
        print(f"python -m tuning.sweep: {exc}", file=sys.stderr)
        return 130
    except SweepIncomplete as exc:
        print(f"python -m tuning.sweep: {exc}", file=sys.stderr)
        return 1
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m tuning.sweep")
