"""`python -m tuning.sweep MODEL --preset lambda`: Ray Tune ablations of DHBE on a backdoored model.

Each trial runs the same DHBE job body as deploy/ (`deploy.ray_job.run_dhbe_loop`). ASHA stops trials
early by a data-free defender score (synthetic agreement minus trigger flip rate): a defender has no
test ASR. The experimenter's test ACC/ASR are reported beside it (`eval_*` columns); any selection by
them is printed as "oracle"."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from defense.cli import ArgumentParser, add_trigger_arguments, positive_int, run_main
from defense.data import DATASETS
from defense.errors import ConfigError

PRESETS = {
    "lambda": {"lam": [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]},
    "lr": {"student_lr": [0.01, 0.02, 0.05, 0.1, 0.2]},
    "patch-size": {"patch_size": [3, 5, 7], "trigger_size": [3, 5, 7]},
    "grid": {"lam": [0.1, 0.5, 1.0], "student_lr": [0.01, 0.05]},
}
SCORE = "defender_score"


def trial(params: dict[str, Any]) -> None:
    """One Tune trial: build the teacher, then run deploy's DHBE job body with Tune's reporting."""
    import torch
    from ray import tune

    from defense.dhbe import DHBEConfig
    from defense.modelio import LoadedModel, load_model
    from defense.scenario import backdoored_scenario
    from deploy.ray_job import job_loop_config, run_dhbe_loop

    setup = params["setup"]
    swept = {k: v for k, v in params.items() if k != "setup"}
    with open(Path(setup["out"]) / "trial_starts.log", "a") as log:
        log.write(json.dumps(swept, sort_keys=True) + "\n")
    if setup.get("fail_once") and swept == setup["fail_once"]:
        marker = Path(setup["out"]) / ".injected-failure"
        if not marker.exists():
            marker.write_text("failed once\n")
            raise RuntimeError(f"injected trial failure for {swept}")
    trigger_size = int(params.get("trigger_size", setup["trigger_size"]))
    if "trigger_size" in params:  # the patch-size preset plants one teacher per trigger size
        scenario = backdoored_scenario(setup["attack"], setup["image_size"], trigger_size, target=setup["target"],
                                       seed=setup["seed"], cache=Path(setup["cache"]))
        teacher = LoadedModel(scenario.teacher, "small-cnn", scenario.bundle.spec, {}, "planted")
        evaluator = scenario.evaluate
    else:
        teacher = load_model(setup["model"])
        evaluator = _evaluator(setup, teacher, trigger_size)
    dhbe_fields = {k: v for k, v in params.items() if k not in ("setup", "trigger_size")}
    if "student_lr" in dhbe_fields and setup.get("scale_generator_lrs", True):
        ratio = dhbe_fields["student_lr"] / setup["base"]["student_lr"]
        dhbe_fields["generator_lr"] = setup["base"]["generator_lr"] * ratio
        dhbe_fields["trigger_lr"] = setup["base"]["trigger_lr"] * ratio
    config = replace(DHBEConfig(**{**setup["base"], "lr_milestones": tuple(setup["base"]["lr_milestones"])}),
                     **dhbe_fields)

    def report(metrics: dict, checkpoint=None) -> None:
        metrics[SCORE] = metrics["synthetic_agreement"] - metrics["trigger_flip_rate"]
        tune.report(metrics, checkpoint=checkpoint)

    context = tune.get_context()
    loop = job_loop_config(teacher, config, threads=1, storage=Path(setup["out"]), name=context.get_trial_id())
    run_dhbe_loop(loop, report=report, get_checkpoint=tune.get_checkpoint, checkpoint_type=tune.Checkpoint,
                  evaluator=evaluator, device=torch.device("cpu"))


def _evaluator(setup: dict, teacher, trigger_size: int):
    from defense.data import load_dataset
    from defense.metrics import evaluate_backdoor
    from defense.triggers import TriggerConfig, make_trigger

    bundle = load_dataset(setup["dataset"], setup["data_dir"], image_size=teacher.spec.height)
    trigger = make_trigger(setup["attack"], teacher.spec, TriggerConfig(trigger_size))
    return lambda model: evaluate_backdoor(model, bundle.test, trigger, setup["target"])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m tuning.sweep", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="backdoored model file (not needed for --preset patch-size, which plants its own)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="lambda")
    p.add_argument("--samples", type=positive_int, default=1, help="repeats (seeds) of every grid point")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (Tune storage, tables, plots)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    p.add_argument("--dataset", default="digits", choices=DATASETS.names(), help="evaluation data (oracle only)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=positive_int, default=16, help="for teachers planted by the preset")
    p.add_argument("--max-concurrent", type=positive_int, default=None, help="default: the cluster's CPUs")
    p.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)  # test hook: JSON of a trial to fail once
    add_trigger_arguments(p)
    from deploy.purify import add_dhbe_arguments

    add_dhbe_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from deploy.purify import dhbe_config_from_args

    base = dhbe_config_from_args(args)
    if args.preset != "patch-size":
        if not args.model:
            raise ConfigError(f"--preset {args.preset} needs a MODEL file")
        if not Path(args.model).exists():
            raise ConfigError(f"model file {args.model} does not exist")
    out = Path(args.out).resolve()
    if args.resume and not (out / "sweep").exists():
        raise ConfigError(f"--resume: no sweep to resume in {out}")
    if not args.resume and (out / "sweep").exists():
        raise ConfigError(f"{out} already holds a sweep; pass --resume or another --out")
    from tuning.runner import SweepIncomplete, run_sweep

    setup = {"model": str(Path(args.model).resolve()) if args.model else None, "attack": args.attack,
             "trigger_size": args.trigger_size, "target": args.target, "dataset": args.dataset,
             "data_dir": args.data_dir, "image_size": args.image_size, "seed": base.seed,
             "base": base.to_dict(), "out": str(out), "cache": str(out / "teachers"),
             "fail_once": json.loads(args.inject_failure) if args.inject_failure else None}
    out.mkdir(parents=True, exist_ok=True)
    try:
        table = run_sweep(setup, PRESETS[args.preset], args.samples, args.scheduler, out, args.resume,
                          args.max_concurrent)
    except SweepIncomplete as exc:
        print(f"python -m tuning.sweep: {exc}", file=sys.stderr)
        return 1
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m tuning.sweep")
