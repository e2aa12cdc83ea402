"""The same Flower apps for Flower's own runner: `flwr run .` loads `server_app` and `client_app`
from here ([tool.flwr.app.components] in pyproject.toml) and passes the settings of
[tool.flwr.app.config] as the run config, e.g.

    flwr run . --run-config "malicious=2 rounds=20 purify=false"

Run-config keys are SimulationConfig's fields in kebab-case (`local-epochs`, `poison-rate`, ...),
plus `out` (run folder; "" = a fresh folder under runs/), `purify` (default true, as the CLI),
`purify-every`, `purify-budget` (seconds; 0 = none), `purify-recipe` (defense.dhbe.RECIPES; default
"default") and `purify-set` (DHBE fields over the recipe, e.g.
"epochs=10 lam=0.5"). Clients build the same configuration from the same run config, so server and
clients agree on who attacks.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from defense.cli import field_pairs
from defense.errors import ConfigError
from federated.apps import load_bundle, serve, train_client
from federated.config import SimulationConfig

RUN_KEYS = ("out", "purify", "purify-every", "purify-budget", "purify-recipe", "purify-set")  # run-config keys that are not SimulationConfig fields


def config_from_run_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    """SimulationConfig from Flower's run config (keys: its fields in kebab-case); unknown keys are a
    ConfigError naming them; values go through SimulationConfig's one typed constructor."""
    by_key = {name.replace("_", "-"): name for name in SimulationConfig.field_names()}
    unknown = sorted(set(run_config) - set(by_key) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; known: {sorted(by_key) + list(RUN_KEYS)}")
    values = {by_key[key]: value for key, value in run_config.items() if key in by_key}
    if values.get("data_dir") == "":
        values["data_dir"] = None
    return SimulationConfig.from_values(values)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return train_client(config_from_run_config(context.run_config), msg, context)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from federated.engine import run_federated
    from defense.dhbe import DEFAULT_RECIPE
    from federated.purification import purification_recipe
    from federated.run_folder import fresh_run_dir

    config = config_from_run_config(context.run_config)
    out = Path(str(context.run_config.get("out", "")) or fresh_run_dir()).resolve()
    spec = load_bundle(config.dataset, config.data_dir, config.image_size).spec

    def rounds_on_this_grid(config: SimulationConfig, run, wrap_strategy=None, start=None) -> None:
        serve(grid, config, run, wrap_strategy or (lambda s: s), start)

    purify = bool(context.run_config.get("purify", True))
    budget = float(context.run_config.get("purify-budget", 0.0) or 0.0)
    recipe = None
    if purify:
        overrides = field_pairs(str(context.run_config.get("purify-set", "")).split(), "run-config purify-set")
        recipe = purification_recipe(str(context.run_config.get("purify-recipe", DEFAULT_RECIPE)),
                                     overrides, config.seed)
        recipe.validate_for(spec)
    run = run_federated(config, out, spec, purify=purify, purify_every=int(context.run_config.get("purify-every", 0)),
                        purify_budget_s=budget if budget > 0 else None, purify_recipe=recipe,
                        rounds_runner=rounds_on_this_grid)
    print(f"run folder: {out}", flush=True)
    if not run.complete:
        print(f"error: the run is incomplete: {run.failure}", file=sys.stderr, flush=True)
