"""What one short GPU run measures (benchmarks/gpu_check.sh runs it): pure PyTorch from the source
tree, no Ray, no Flower, no pytest (the device machine has none of them).

1. checks that make sense on CUDA: one epoch of the default recipe with every extension forced on,
   under `DeviceDiscipline(device)` (no tensor made off the model's device, no mixed devices), and
   the same epoch twice from one seed (deterministic state on the device);
2. throughput: the official loop's structure against the project's loop (fp32 and bf16), ResNet-18 32x32
   batch 256 (benchmarks/paper_scale.py), and the projected 15,000 iterations;
3. the default purification of the digits model built here with the project's scenario builder and
   the same seed as the CPU figures, in fp32 and in bf16 (`precision=bf16`), ACC/ASR beside the CPU reference
   (benchmarks/results/gpu_check_cpu_reference.json).

    python -m benchmarks.gpu_check OUT [--device cuda] [--dry-run]
    python -m benchmarks.gpu_check OUT --cpu-reference      # the CPU figures it is compared with

`--dry-run`: every step at a tiny size on the CPU (CI, under 3 minutes). Writes OUT/gpu_check.json;
`--cpu-reference` writes OUT/gpu_check_cpu_reference.json (`_bf16` with --precision bf16), never the
committed reference it is compared with: to update that, copy the file into benchmarks/results/."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.paper_scale import PAPER_ITERATIONS, SIDES, seconds_per_iteration
from defense.device_check import DeviceDiscipline
from defense.dhbe import recipe_config, scanned_trainer, smoke_sized, train_epochs
from defense.fileio import atomic_write_json
from defense.scenario import backdoored_scenario
from defense.cli import ArgumentParser

PROJECT = Path(__file__).resolve().parents[1]
CPU_REFERENCE = PROJECT / "benchmarks" / "results" / "gpu_check_cpu_reference.json"


def every_extension_on():
    """The default at smoke size with every extension forced on (the game runs blind: every class)."""
    recipe = smoke_sized(recipe_config("default", {"verdict.hand_back_clean": False, "sample_pool": "on",
                                                   "perturbations.refresh_every": 1,
                                                   "lambda_step": "on"}))
    return recipe.replace(epochs=2)


def device_checks(device: str, scenario, dry_run: bool) -> dict:
    recipe = every_extension_on()
    with DeviceDiscipline(device, [PROJECT / "defense"]) as check:
        trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe, device)
        train_epochs(trainer)
        trainer.evidence()
    again = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe, device)
    train_epochs(again)
    same = all(torch.equal(a, b) for a, b in zip(trainer.student.state_dict().values(),
                                                   again.student.state_dict().values()))
    return {"device_violations": [f"{v.where}: {v.what}" for v in check.violations[:20]],
            "device_discipline_ok": not check.violations, "deterministic_on_device": same}


def default_purification(device: str, scenario, dry_run: bool, precision: str = "fp32") -> dict:
    recipe = recipe_config("default", {"precision": precision})
    if dry_run:
        recipe = smoke_sized(recipe)
    started = time.perf_counter()
    trainer = scanned_trainer(scenario.teacher, scenario.bundle.spec, recipe, device)
    train_epochs(trainer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    before = scenario.evaluate(scenario.teacher)
    after = scenario.evaluate(trainer.output_model().to("cpu").eval())
    verdict = trainer.evidence().get("verdict", {})
    return {"precision": precision, "wall_s": round(wall, 1), "epochs": trainer.epoch,
            "acc_before": before["acc"], "asr_x1_before": before["asr_x1"],
            **{f"{k}_after": after.get(k) for k in ("acc", "asr_x1", "asr_x9")},
            "suspected": verdict.get("suspected_targets")}


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--cpu-reference", action="store_true",
                        help="only the default purification, on this CPU: OUT/gpu_check_cpu_reference.json "
                             "(the committed one, benchmarks/results/gpu_check_cpu_reference.json, is read, not written)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="with --cpu-reference: the precision of that purification (bf16 writes its own file)")
    args = parser.parse_args()
    if args.cpu_reference:
        torch.set_num_threads(2)
        scenario = backdoored_scenario("badnets", 16, 3, 0.1, target=0, seed=0, epochs=30, cache=Path(args.out) / "teachers")
        reference = {"device": "cpu", "threads": 2, "torch": torch.__version__,
                     **default_purification("cpu", scenario, dry_run=False, precision=args.precision)}
        suffix = "" if args.precision == "fp32" else f"_{args.precision}"
        target = Path(args.out) / f"{CPU_REFERENCE.stem}{suffix}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, reference)
        print(json.dumps(reference))
        print(f"wrote {target}")
        return
    device = "cpu" if args.dry_run else args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": device, "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"}
    # the digits model of the CPU figures: BadNets 3x3, 10% poisoned, target 0, seed 0 (scenario builder)
    scenario = backdoored_scenario("badnets", 16, 3, 0.1, target=0, seed=0, epochs=2 if args.dry_run else 30,
                                   cache=out / "teachers")
    result["checks"] = device_checks(device, scenario, args.dry_run)
    print(json.dumps({"checks": result["checks"]}), flush=True)
    throughput = {}
    for side in SIDES:
        seconds = seconds_per_iteration(side, device, 1 if args.dry_run else 5, 0 if args.dry_run else 2, args.dry_run)
        throughput[side] = {"seconds_per_iteration": round(seconds, 4), "it_per_s": round(1 / seconds, 3),
                            "projected_hours_15000": round(seconds * PAPER_ITERATIONS / 3600, 2)}
        print(f"{side} loop: {1 / seconds:.3f} it/s ({'tiny' if args.dry_run else 'ResNet-18 32x32 batch 256'}, {device})",
              flush=True)
    result["throughput"] = throughput
    result["default_purification"] = default_purification(device, scenario, args.dry_run)
    result["default_purification_bf16"] = default_purification(device, scenario, args.dry_run, precision="bf16")
    if CPU_REFERENCE.exists() and not args.dry_run:
        result["cpu_reference"] = json.loads(CPU_REFERENCE.read_text())
    print(json.dumps({"default_purification": result["default_purification"],
                      "default_purification_bf16": result["default_purification_bf16"]}), flush=True)
    atomic_write_json(out / "gpu_check.json", result)
    if not result["checks"]["device_discipline_ok"]:
        raise SystemExit("device discipline violated: " + "; ".join(result["checks"]["device_violations"][:3]))


if __name__ == "__main__":
    main()
