"""Do K data-parallel processes play the game one process plays with the whole batch?

K CPU processes (torch.distributed, gloo) each build the same DHBETrainer with `DataParallel` and run
the same iterations; one process runs them alone with the whole batch. The largest difference in
S's, G's and Gp's weights and batch-norm statistics, and in the epoch's losses, is the answer
(tests/test_data_parallel.py asserts it under 1e-5 after 2 iterations; defense/dhbe/parallel.py says
how the game is split).

    python tests/helpers/data_parallel_check.py [--workers 2] [--recipe official|every-extension]
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.gpu_check import every_extension_on
from defense.dhbe import Recipe, recipe_config, scanned_trainer
from defense.dhbe.parallel import SINGLE_PROCESS, DataParallel
from defense.models import build_model
from defense.spec import InputSpec
from defense.cli import ArgumentParser

SPEC = InputSpec(channels=1, height=16, width=16, num_classes=10, mean=(0.5,), std=(0.5,))
MODEL = "small-cnn"


def official_tiny() -> Recipe:
    """The official game (no extension) at a seconds-long size: 2 iterations of 2 student steps."""
    return recipe_config("official", {"epochs": 1, "iters_per_epoch": 2, "student_steps": 2, "batch_size": 16,
                                      "generator_width": 8, "trigger_width": 8, "latent_dim": 16,
                                      "trigger_latent_dim": 16, "patch_size": 3})


def every_extension_tiny() -> Recipe:
    """The default at smoke size with every extension forced on, one epoch of 2 iterations: the probes
    and searches run replicated, the game's iterations split."""
    return every_extension_on().replace(epochs=1, iters_per_epoch=2)


RECIPES = {"official": official_tiny, "every-extension": every_extension_tiny}


def teacher_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(MODEL, SPEC).state_dict()


# In float32 the K-process game drifts from the one-process game at rounding level, amplified by
# the game itself: S starts as T, so L1(S(x), T(x))'s gradient is sign(S(x) - T(x)) on differences of
# ~1e-7, and Adam's first steps are lr * sign(g) where a gradient is ~0 (a bias before a batch norm).
# The check runs in float64 (`dtype`), where the same data flow must agree to far below 1e-5; the
# float32 figure is reported beside it.
def play(recipe: Recipe, teacher: dict[str, torch.Tensor], parallel=SINGLE_PROCESS,
         dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """The recipe's epochs in `dtype`; the trained players' states (S, G, Gp), the last epoch's losses
    and every epoch's seconds."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(MODEL, SPEC)
        model.load_state_dict(teacher)
        trainer = scanned_trainer(model, SPEC, recipe, "cpu", parallel=parallel)   # the scan replicated
        seconds = []
        while trainer.epoch < recipe.dhbe.epochs:
            started = time.perf_counter()
            record = trainer.run_epoch()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_default_dtype(default)
    states = {f"{name}.{key}": value.detach().clone().double() for name, module in
              (("student", trainer.student), ("sample_generator", trainer.sample_generator),
               ("trigger_generator", trainer.trigger_generator)) for key, value in module.state_dict().items()}
    losses = {"loss_student": record.loss_student, "loss_distill": record.loss_distill,
              "loss_regulariser": record.loss_regulariser}
    return {"states": states, "losses": losses, "stopped": trainer.stop_reason, "seconds": seconds}


# The parts of the split, each of which the agreement needs (`--leave-out`: the check must then fail)
PARTS = ("batch_norm_sync", "gradient_average")


def _worker(rank: int, world: int, recipe: dict, teacher: dict, rendezvous: str, out: str, dtype: torch.dtype,
            leave_out: Optional[str], threads: int = 1) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        parallel = DataParallel()
        if leave_out == "batch_norm_sync":
            parallel.synchronise_batch_norm = lambda *modules: None
        elif leave_out == "gradient_average":
            parallel.average_gradients = lambda module: None
        result = play(Recipe.from_dict(recipe), teacher, parallel, dtype)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def compare(recipe: Recipe, workers: int = 2, dtype: torch.dtype = torch.float64,
            leave_out: Optional[str] = None) -> dict[str, Any]:
    """The largest differences between each of `workers` processes and one process with the whole batch
    (`leave_out`: one of PARTS switched off in the workers)."""
    teacher = teacher_state()
    torch.set_num_threads(1)
    alone = play(recipe, teacher, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="dhbe-dp-") as folder:
        mp.spawn(_worker, args=(workers, recipe.to_dict(), teacher, str(Path(folder) / "rendezvous"), folder, dtype, leave_out),
                 nprocs=workers, join=True)
        results = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(workers)]
    weights = max(float((result["states"][key] - value).abs().max()) for result in results
                  for key, value in alone["states"].items() if value.numel())
    losses = max(abs(result["losses"][key] - value) for result in results for key, value in alone["losses"].items())
    moved = max(float((value - teacher[key.split(".", 1)[1]].float()).abs().max()) for key, value in
                alone["states"].items() if key.startswith("student.") and value.is_floating_point()
                and "num_batches" not in key)
    return {"workers": workers, "dtype": str(dtype).replace("torch.", ""), "left_out": leave_out,
            "max_weight_difference": weights, "max_loss_difference": losses, "student_moved_by": moved, "stopped": [alone["stopped"]] + [r["stopped"] for r in results]}


def timing(recipe: Recipe, workers: int) -> dict[str, Any]:
    """Seconds per epoch of `recipe` (float32) in one process with every core, and in `workers`
    processes sharing the cores; the first epoch (with the probes) apart from the others."""
    teacher, cores = teacher_state(), os.cpu_count() or 1
    torch.set_num_threads(cores)
    alone = play(recipe, teacher, dtype=torch.float32)["seconds"]
    with tempfile.TemporaryDirectory(prefix="dhbe-dp-") as folder:
        mp.spawn(_worker, args=(workers, recipe.to_dict(), teacher, str(Path(folder) / "rendezvous"), folder,
                                torch.float32, None, max(1, cores // workers)), nprocs=workers, join=True)
        split = torch.load(Path(folder) / "rank0.pt", weights_only=True)["seconds"]
    later = lambda s: round(sum(s[1:]) / max(len(s) - 1, 1), 2)
    return {"recipe_epochs": recipe.dhbe.epochs, "cores": cores, "workers": workers,
            "one_process_first_epoch_s": round(alone[0], 1), "one_process_later_epochs_s": later(alone),
            "split_first_epoch_s": round(split[0], 1), "split_later_epochs_s": later(split)}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, choices=range(2, 9), metavar="2..8")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="official")
    parser.add_argument("--leave-out", choices=PARTS, help="switch one part of the split off (the check must fail)")
    parser.add_argument("--timing", choices=("cpu", "official-tiny"), default=None,
                        help="instead: seconds per epoch, one process against the split (3 epochs of this recipe)")
    args = parser.parse_args(argv)
    if args.timing:
        recipe = (recipe_config("cpu", {"epochs": 3}) if args.timing == "cpu"
                  else official_tiny().replace(epochs=3))
        print(json.dumps({"timing": args.timing, **timing(recipe, args.workers)}))
        return 0
    for dtype in (torch.float64, torch.float32):
        print(json.dumps({"recipe": args.recipe, **compare(RECIPES[args.recipe](), args.workers, dtype, args.leave_out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
