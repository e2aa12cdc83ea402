"""CUDA correctness on a CPU machine: one DHBE epoch of the default recipe with every extension forced
on makes no tensor without the model's device, and the check can fail."""
from pathlib import Path

import torch

from benchmarks.gpu_check import every_extension_on
from defense.device_check import DeviceDiscipline
from defense.dhbe import scanned_trainer, train_epochs

PROJECT = Path(__file__).parents[1]
DHBE_CODE = [PROJECT / "defense"]


def test_one_dhbe_epoch_with_every_extension_makes_nothing_off_the_models_device(badnets_scenario):
    recipe = every_extension_on()
    names = set(recipe.extension_names)
    assert {"verdict", "perturbations", "student_ema",
            "class_balance", "bn_prior", "prior_only_generator", "sample_pool", "lambda_step"} <= names
    with DeviceDiscipline("cpu", DHBE_CODE) as check:
        trainer = scanned_trainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, recipe)
        train_epochs(trainer)
        trainer.evidence()
    assert trainer.epoch == 2
    assert check.violations == [], "\n".join(f"{v.where}: {v.what}" for v in check.violations[:20])


def test_the_check_catches_a_planted_host_tensor_and_a_cpu_generator():
    def planted():
        hidden = torch.zeros(3)                                              # no device
        draws = torch.randint(0, 5, (4,), generator=torch.Generator(), device="cpu")
        return hidden, draws

    with DeviceDiscipline("cuda", [Path(__file__).parent]) as check:   # as if the model were on CUDA
        planted()
    kinds = [v.what for v in check.violations]
    assert any("zeros() without device=" in k for k in kinds)
    assert any("randint() on cpu, not cuda" in k for k in kinds) and any("cpu generator" in k for k in kinds)
    assert all(v.where.startswith("test_device_check.py:") for v in check.violations)
