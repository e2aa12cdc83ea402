"""DHBE: Data-free Holistic Backdoor Erasing (Yan et al., AsiaCCS 2023).

- `config`: `DHBEConfig` (the official fields), `Recipe` (official fields + a list of extensions),
  the one constructor from strings / dicts
- `losses`: the terms of Eq. 8
- `game`: `DHBETrainer`, Algorithm 1 with the extension points
- `extensions/`: every departure, a named extension with its own config, validation and state
- `recipes`: `RECIPES` (default, official, cpu, federated)
- `loop`: the scan stage (`scan_stage`, defense/scan), the epoch loop (`train_epochs`) and `purify`
"""
from defense.dhbe.config import EXTENSIONS, DHBEConfig, ExtensionConfig, Recipe, coerce_fields
from defense.dhbe.game import DHBETrainer, EpochRecord
from defense.dhbe.loop import Evaluator, purify, scan_stage, scanned_trainer, train_epochs
from defense.dhbe.recipes import (DEFAULT_RECIPE, RECIPES, cpu_recipe, default_recipe, federated_recipe,
                                  official_recipe, plain_adversarial_distillation, recipe_config,
                                  smoke_sized, without_regularisers)

__all__ = ["EXTENSIONS", "DEFAULT_RECIPE", "DHBEConfig", "DHBETrainer", "EpochRecord", "Evaluator", "ExtensionConfig",
           "RECIPES", "Recipe", "coerce_fields", "cpu_recipe", "default_recipe", "federated_recipe",
           "official_recipe", "plain_adversarial_distillation", "purify", "recipe_config", "scan_stage", "scanned_trainer", "smoke_sized",
           "train_epochs",
           "without_regularisers"]
