"""Recipes: the official game with a list of extensions. `RECIPES` is the one source of their names."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from defense.dhbe.config import DHBEConfig, Recipe
from defense.dhbe.extensions import (BatchNormPriorConfig, ClassBalanceConfig, LambdaStepConfig, PerturbationsConfig,
                                     PriorOnlyGeneratorConfig, StudentEMAConfig, VerdictConfig)
from defense.registry import Registry
from defense.scan import ScanConfig

RECIPES: Registry[Callable[[], Recipe]] = Registry("DHBE recipe")
DEFAULT_RECIPE = "default"


def recipe_config(name: str = DEFAULT_RECIPE, overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """The recipe `name` with FIELD=VALUE overrides (strings or JSON values, see Recipe.with_overrides):
    the one constructor every CLI, the hook, `flwr run`, Tune and the benchmarks use."""
    return RECIPES.get(name)().with_overrides(overrides or {})


@RECIPES.register("official")
def official_recipe() -> Recipe:
    """The official code's defaults (paper scale: ResNet-18, CIFAR-10, 300 x 50 iterations), no extension."""
    return Recipe(DHBEConfig())


CPU_SCALE = DHBEConfig(lam=1.0, epochs=30, iters_per_epoch=10, batch_size=128, student_lr=0.05, generator_width=16,
                       trigger_width=16, latent_dim=64, trigger_latent_dim=64, patch_size=3, trigger_lr=0.01,
                       lr_milestones=(0.8, 0.9))


@RECIPES.register("cpu")
def cpu_recipe() -> Recipe:
    """The project's CPU-scale recipe for small models (docs/research/dhbe-log.md, rounds one to four): Gp's patches
    stamped 1..9 times, most drawn from a bank Gp filled against T before the game, on every sample."""
    return Recipe(CPU_SCALE, (
        PerturbationsConfig(scan_triggers=False, perturbed_share=1.0),
        StudentEMAConfig(decay=0.995),
        PriorOnlyGeneratorConfig(),
        ClassBalanceConfig(weight=1.0),
        BatchNormPriorConfig(weight=1.0),
    ))


@RECIPES.register("federated")
def federated_recipe() -> Recipe:
    """The CPU recipe for a federated (FedAvg) global model (docs/research/dhbe-log.md, fifth round): G's batch-norm
    prior on T's first BN layer only (the deeper statistics made G's samples re-teach ASR x9), 15
    epochs (x9 relapsed in the second half of 30), and lambda 1 -> 0.7 after half of them (ACC).
    On centrally poisoned models it cost more ACC than `cpu`, which stays their recipe."""
    cpu = cpu_recipe()
    return Recipe(cpu.replace(epochs=15).dhbe, cpu.extensions).with_extension(
        BatchNormPriorConfig(weight=1.0, layers=1)).with_extension(LambdaStepConfig(after=0.7, at=0.5))


DEFAULT_EPOCHS = 20


@RECIPES.register("default")
def default_recipe() -> Recipe:
    """The one default: it needs no knowledge of the attack (docs/dhbe.md, "How the default works").
    First the scan (defense/scan, docs/scan.md): no suspect class, and T is handed back unchanged. A
    suspect, and the game runs: Eq. 8 with S shown, on half of every perturbed batch, Gp's stamped
    patches and the scan's own inverted triggers of the suspects, re-found on S every 5 epochs
    (`perturbations`), S's moving average handed back, guarded by its synthetic agreement with T."""
    cpu = cpu_recipe()
    return Recipe(cpu.replace(epochs=DEFAULT_EPOCHS).dhbe,
                  (VerdictConfig(), PerturbationsConfig(), *cpu.without("perturbations").extensions), ScanConfig())


def without_regularisers(recipe: Recipe) -> Recipe:
    """The same recipe with no backdoor regulariser at all: lambda = 0 (no perturbed batch), no verdict."""
    return Recipe(recipe.replace(lam=0.0).without("verdict").dhbe, recipe.without("verdict").extensions)


def plain_adversarial_distillation(recipe: Recipe) -> Recipe:
    """The paper's ablation: no backdoor regulariser (lambda = 0), G back in the adversarial game."""
    return without_regularisers(recipe).without("prior_only_generator")


def smoke_sized(recipe: Recipe) -> Recipe:
    """The same recipe at a seconds-long size (the benchmarks' --tiny runs in CI): one short epoch,
    and the extensions present shrunk in step; nothing is added or removed."""
    shrink = {"perturbations.warmup_steps": 20, "perturbations.refresh_steps": 2}
    small = recipe.replace(epochs=1, iters_per_epoch=2, batch_size=16).with_overrides(
        {key: value for key, value in shrink.items() if key.split(".")[0] in recipe})
    return small if small.scan is None else Recipe(small.dhbe, small.extensions, small.scan.smoke_sized())
