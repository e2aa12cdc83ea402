"""Ray Train overhead: the same DHBE config in-process (`defense.dhbe.purify`) and as the Ray Train
job of deploy/ (fresh local Ray, init included). `python -m benchmarks.ray_overhead [--out STEM] [--tiny]`
writes STEM.json (default runs/bench/ray_overhead; the committed one: --out benchmarks/results/ray_overhead)."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from defense.dhbe import cpu_recipe, purify
from defense.modelio import LoadedModel
from defense.scenario import backdoored_scenario
from benchmarks.tables import add_out_argument, write_output
from defense.cli import ArgumentParser


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    add_out_argument(parser, "ray_overhead", (".json",))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    scenario = backdoored_scenario(epochs=3 if args.tiny else 30, cache=None if args.tiny else Path("runs/teachers"))
    config = cpu_recipe().replace(epochs=1 if args.tiny else args.epochs, iters_per_epoch=2 if args.tiny else 10)

    started = time.perf_counter()
    purify(scenario.teacher, scenario.bundle.spec, config)
    in_process = time.perf_counter() - started

    import ray

    from deploy.ray_job import PurifyJobConfig, run_purify_job

    teacher = LoadedModel(scenario.teacher, "small-cnn", scenario.bundle.spec, {}, "benchmark")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run_purify_job(teacher, PurifyJobConfig(recipe=config, storage_path=folder), Path(folder) / "out")
        on_ray = time.perf_counter() - started
    ray.shutdown()
    result = {"in_process_s": round(in_process, 1), "ray_train_s": round(on_ray, 1),
              "overhead_s": round(on_ray - in_process, 1), "iterations": config.dhbe.iterations,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    print(json.dumps(result))
    if not args.tiny:
        write_output(args, ".json", result)


if __name__ == "__main__":
    main()
