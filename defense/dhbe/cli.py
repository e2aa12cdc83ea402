"""The DHBE flags every command shares (`--recipe`, `--config`, `--set`) and the one way they become
a `Recipe`: `deploy.purify`, `tuning.sweep` and the benchmarks call `recipe_from_args`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from defense.cli import field_pairs
from defense.dhbe.config import EXTENSIONS, Recipe
from defense.dhbe.recipes import DEFAULT_RECIPE, RECIPES, recipe_config
from defense.errors import ConfigError
from defense.modelio import read_json_object

MAX_CONFIG_BYTES = 1 << 20

SET_HELP = ("override recipe fields: an official field (lam=0.5 epochs=10), an extension's field "
            "(NAME.FIELD=VALUE, adding NAME if absent) or NAME=off|on; extensions: ")


def add_recipe_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_RECIPE,
                         recipe_flag: str = "--recipe", set_flag: str = "--set", config_flag: Optional[str] = "--config",
                         purify_aliases: bool = False) -> None:
    """`purify_aliases`: also take the names federated.simulate gives these flags (`--purify-recipe`,
    `--purify-set`), so one name works in every command that purifies."""
    group = parser.add_argument_group("DHBE recipe")
    aliases = purify_aliases and recipe_flag == "--recipe" and set_flag == "--set"
    group.add_argument(recipe_flag, *(("--purify-recipe",) if aliases else ()), dest="recipe", choices=RECIPES.names(), default=default,
                       help="default: needs no knowledge of the attack (a data-free verdict, then the "
                            "regularisers; a model with no backdoor found is handed back unchanged); cpu, "
                            "federated: research presets; official: the paper's defaults (docs/dhbe.md)")
    if config_flag:
        group.add_argument(config_flag, dest="recipe_file", default=None,
                           help="JSON file: a whole recipe ({\"dhbe\": {...}, \"extensions\": [[name, {...}], ...], \"scan\": {...}}) "
                                "or an object of FIELD: VALUE overrides over the recipe")
    group.add_argument(set_flag, *(("--purify-set",) if aliases else ()), dest="recipe_set", nargs="*", default=[], metavar="FIELD=VALUE",
                       help=SET_HELP + ", ".join(EXTENSIONS.names()))
    parser.set_defaults(recipe_set_flag=set_flag)


def recipe_from_args(args: argparse.Namespace, defaults: Optional[dict[str, Any]] = None) -> Recipe:
    """The recipe the flags name; `defaults` (e.g. the run's seed) go under the user's --set values.
    Every name and value is checked (ConfigError) before anything runs."""
    recipe = recipe_config(args.recipe, defaults)
    path = getattr(args, "recipe_file", None)
    if path:
        recipe = recipe_file(Path(path), recipe)
    return recipe.with_overrides(field_pairs(args.recipe_set, getattr(args, "recipe_set_flag", "--set")))


def recipe_file(path: Path, base: Recipe) -> Recipe:
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    data = read_json_object(path, "--config")   # valid, not nested too deeply, an object
    if set(data) <= {"dhbe", "extensions", "scan"} and {"dhbe", "extensions"} & set(data):
        return Recipe.from_dict(data)
    return base.with_overrides(data)
