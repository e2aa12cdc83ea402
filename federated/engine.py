"""Runs the Flower apps on Flower's simulation engine (Ray backend), one CPU per client actor."""
from __future__ import annotations

import contextlib

import logging
import os
from pathlib import Path
from typing import Callable, Optional

from defense.dhbe import Recipe
from defense.experiment import Experiment
from defense.spec import InputSpec
from deploy.ray_job import SERVER_JOB_RESOURCE, protect_local_ray, quiet_ray_environment
from federated.config import SimulationConfig
from federated.run_folder import RunFolder


def run_simulation_rounds(config: SimulationConfig, run: RunFolder,
                          wrap_strategy: Optional[Callable] = None, verbose: bool = False,
                          client_app_factory: Optional[Callable] = None, start=None) -> None:
    """Train for `config.rounds` rounds; every round's metrics and model land in `run`.
    `client_app_factory(config)` builds the ClientApp (default federated.apps.make_client_app; tests
    plant misbehaving clients through it)."""
    quiet_ray_environment()
    protect_local_ray()
    from flwr.simulation import run_simulation

    from federated.apps import make_client_app, make_server_app

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    quiet_flower_logs()
    cpus = max(1, min(os.cpu_count() or 1, config.clients))
    backend = {"client_resources": {"num_cpus": config.cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR",
                             "log_to_driver": False,
                             # a slot no client actor claims: server-side jobs (in-run purification)
                             # run on it instead of waiting for the CPUs the client actors hold
                             "resources": {SERVER_JOB_RESOURCE: 1.0}}}
    server_app = make_server_app(config, run, wrap_strategy or (lambda s: s), start)
    run_simulation(server_app=server_app, client_app=(client_app_factory or make_client_app)(config), num_supernodes=config.clients,
                   backend_config=backend, verbose_logging=verbose)


class _FlowerNoise(logging.Filter):
    """Drops Flower's notices a user of this project cannot act on: the `run_simulation` deprecation
    banner (the simulation engine is the project's choice; `flwr run .` is offered beside it) and the
    note that federated evaluation is off (the server evaluates the global model itself)."""

    NOTICES = ("DEPRECATED FEATURE: The `run_simulation`", "This is a deprecated feature",
               "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def quiet_flower_logs() -> None:
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _FlowerNoise) for f in logger.filters):
        logger.addFilter(_FlowerNoise())
    for handler in logger.handlers:
        if not any(isinstance(f, _FlowerNoise) for f in handler.filters):
            handler.addFilter(_FlowerNoise())


RoundsRunner = Callable[..., None]  # (config, run, wrap_strategy=..., start=...) -> None: trains into `run`


def run_federated(config: SimulationConfig, out: Path, spec: InputSpec, purify: bool = True,
                  purify_every: int = 0, purify_budget_s: Optional[float] = None,
                  purify_recipe: Optional[Recipe] = None, quiet: bool = False,
                  rounds_runner: RoundsRunner = run_simulation_rounds, resume: bool = False) -> RunFolder:
    """Train (by default on Flower's simulation engine), then purify and report. `rounds_runner`
    is how another engine (`flwr run .`, see federated.flwr_app) plugs the same run in. `purify_recipe`:
    the DHBE recipe (default: federated.purification's default, seeded by the run). `resume`: `out`
    is an interrupted run folder of this config; the run goes on after its last saved round."""
    start = last = None
    if resume:
        from federated.apps import model_to_arrays

        run, last = RunFolder.reopen(out, config.model, spec, quiet=quiet, experiment=config.experiment().to_dict())
        start = model_to_arrays(last.model) if last is not None else None
        if last is not None and last.manifest.get("experiment"):   # A3FL: the trigger of the last saved round
            record = Experiment.from_dict(last.manifest["experiment"], f"{out}'s last saved model")  # checked here
            run.experiment = record.to_dict()
    else:
        run = RunFolder(out, {"simulation": config.to_dict(), "purify": purify, "purify_every": purify_every},
                        config.model, spec, quiet=quiet, experiment=config.experiment().to_dict())
    try:
        hook = None
        if purify:
            from federated.purification import federated_purification

            hook = federated_purification(config, run, spec, every=purify_every, budget_s=purify_budget_s,
                                          recipe=purify_recipe)
        if len(run.rows) < config.rounds:
            rounds_runner(config, run, wrap_strategy=hook.wrap if hook else None,
                          **({"start": start} if start is not None else {}))
        elif last is not None and not (run.root / "final.json").exists():   # killed after the last round
            run.save_final(last.model)
        if run.failure is None and (not run.rows or len(run.rows) < config.rounds):
            run.failure = f"the simulation ended after {len(run.rows)} of {config.rounds} rounds"
        if run.failure is not None:
            run.set_status("incomplete", reason=run.failure)
            return run
        if 0 < config.last_attack_round() < config.rounds:   # an attack window that ends before the run
            run.add_lifespan(config.last_attack_round())
        comparison = hook.finish() if hook else None
        run.finish(comparison)
    except BaseException as exc:
        with contextlib.suppress(OSError):   # a full disk or a removed folder: the last status written stays
            run.set_status("incomplete", reason=f"{type(exc).__name__}: {exc}"[:300])
        raise
    return run
