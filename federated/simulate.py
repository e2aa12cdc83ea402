"""`python -m federated.simulate --malicious 2`: federated training with malicious clients on
Flower's simulation engine, then (unless --no-purify) server-side DHBE purification of the global
model through the Ray Train job of deploy/. Writes a run folder (see --out)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from defense.cli import (ArgumentParser, add_trigger_arguments, fraction, non_negative_int, positive_float,
                         positive_int, run_main, seed_value, writable_destination)
from defense.data import DATASETS
from defense.dhbe.cli import add_recipe_arguments, recipe_from_args
from defense.errors import ConfigError, shown
from defense.models import MODELS
from federated.config import ATTACKERS, PARTITIONS, WEIGHTINGS, SimulationConfig


def parse_attack_rounds(text: str) -> tuple[int, int]:
    """'all' -> (1, 0); 'from:K' or 'K' -> (K, 0) (from round K on); 'K:L' -> (K, L) (rounds K to L)."""
    if text == "all":
        return 1, 0
    first, _, last = (text.split(":", 1)[1] if text.startswith("from:") else text).partition(":")
    try:
        window = int(first), int(last) if last else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'K', 'from:K' or 'K:L', got {shown(text)}") from None
    if window[0] < 1:
        raise argparse.ArgumentTypeError(f"the first attack round must be >= 1, got {window[0]}")
    return window   # L >= K: SimulationConfig's check


def build_parser() -> ArgumentParser:
    from federated.strategies import AGGREGATIONS

    p = ArgumentParser(prog="python -m federated.simulate", description=__doc__)
    p.add_argument("--clients", type=positive_int, default=10, help="number of clients (supernodes)")
    p.add_argument("--malicious", type=non_negative_int, default=2, help="how many clients attack")
    p.add_argument("--rounds", type=positive_int, default=20, help="federated rounds")
    p.add_argument("--local-epochs", type=positive_int, default=2, help="local epochs per round")
    p.add_argument("--local-lr", type=positive_float, default=0.05, help="clients' SGD learning rate")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seeds partitions, clients, attacks and the purification (the same seed, the same run)")
    p.add_argument("--dataset", default="digits", choices=DATASETS.names(),
                   help="digits is embedded (scikit-learn's handwritten digits); the others load from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder (or Parquet file) of a local data set")
    p.add_argument("--image-size", type=positive_int, default=16, help="resize images to this side")
    p.add_argument("--model", default="small-cnn", choices=MODELS.names(), help="the network every client trains")
    p.add_argument("--partition", default="iid", choices=PARTITIONS,
                   help="how the training set is split over clients: iid, or dirichlet (non-IID, see --alpha)")
    p.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")
    add_trigger_arguments(p)
    p.add_argument("--poison-rate", type=fraction, default=0.5, help="fraction of a malicious client's data poisoned")
    p.add_argument("--attack-rounds", type=parse_attack_rounds, default="all", metavar="all|K|from:K|K:L",
                   help="rounds in which attackers poison: from round K on, or rounds K to L (then the summary "
                        "reports the backdoor's lifespan after round L)")
    p.add_argument("--attacker", default="plain", choices=ATTACKERS,
                   help="how attackers poison: plain, neurotoxin (updates kept off the coordinates the last "
                        "global update moved most), or a3fl (the patch re-optimised against each round's global "
                        "model and an adapted copy of it; --attack badnets; ASR is measured with the latest one)")
    p.add_argument("--neurotoxin-top-k", type=float, default=0.01,
                   help="--attacker neurotoxin: share of coordinates (largest last global update) left untouched")
    p.add_argument("--a3fl-steps", type=positive_int, default=30, help="--attacker a3fl: trigger steps per attack round")
    p.add_argument("--a3fl-adversary-steps", type=non_negative_int, default=1,
                   help="--attacker a3fl: steps of the trigger-unlearning copy of the global model per trigger step")
    p.add_argument("--a3fl-step-size", type=positive_float, default=0.03,
                   help="--attacker a3fl: step on the patch's pixel values (in [0, 1])")
    p.add_argument("--sample", type=non_negative_int, default=0,
                   help="clients trained per round, a seeded draw out of --clients (0 = every client)")
    p.add_argument("--boost", type=float, default=1.0, help="model-replacement scaling of malicious updates")
    p.add_argument("--aggregation", default="fedavg", choices=AGGREGATIONS.names(),
                   help="the server's aggregation: FedAvg, Flower's robust strategies, or an in-training "
                        "defence (flame, foolsgold, rlr, clip, dp)")
    p.add_argument("--clip-norm", type=positive_float, default=1.0, help="update norm bound for --aggregation clip and dp")
    p.add_argument("--dp-noise", type=float, default=0.1,
                   help="--aggregation dp: noise multiplier (std = this x --clip-norm / clients)")
    p.add_argument("--flame-noise", type=float, default=0.001,
                   help="--aggregation flame: noise std as a fraction of the median update norm (FLAME's 0.001)")
    p.add_argument("--foolsgold-kappa", type=float, default=1.0, help="--aggregation foolsgold: the logit's confidence")
    p.add_argument("--rlr-threshold", type=positive_int, default=4,
                   help="--aggregation rlr: how many clients must agree on a coordinate's sign for the server's "
                        "learning rate there to stay +1 (Ozdayi et al.'s 4 of 10)")
    p.add_argument("--max-update-norm", type=positive_float, default=10.0,
                   help="reject client updates with ||local - global|| > this x ||global||")
    p.add_argument("--client-weighting", default="known", choices=WEIGHTINGS,
                   help="aggregation weights: known (a client's num-examples capped at the size of the partition the "
                        "server assigned it) or equal (every accepted reply weight 1)")
    p.add_argument("--node-wait-s", "--node-wait", dest="node_wait_s", type=positive_float, default=120.0,
                   help="seconds the server waits for every client's node to connect before it stops")
    p.add_argument("--round-timeout-s", "--round-timeout", dest="round_timeout_s", type=positive_float, default=600.0,
                   help="seconds to wait for clients per round")
    p.add_argument("--client-failure-rate", type=fraction, default=0.0,
                   help="fraction of clients that fail every round (an unreliable-clients experiment)")
    p.add_argument("--local-batch-size", type=positive_int, default=32, help="clients' mini-batch size")
    p.add_argument("--trimmed-beta", type=float, default=0.2,
                   help="fraction trimmed at each end by --aggregation trimmed-mean, in (0, 0.5)")
    p.add_argument("--cpus-per-client", type=positive_float, default=1.0, help="CPUs each client actor holds")
    p.add_argument("--out", default=None, help="run folder (default: a fresh folder runs/sim-DATE-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN_FOLDER",
                   help="go on with an interrupted run from its last saved round, with the run's own settings "
                        "(its config.json; the purification flags are this command's)")
    p.add_argument("--no-purify", action="store_true", help="skip server-side DHBE purification")
    p.add_argument("--purify-every", type=non_negative_int, default=0,
                   help="also purify every K rounds (0 = only at the end)")
    p.add_argument("--purify-budget", type=positive_float, default=None,
                   help="DHBE wall-time budget in seconds (default: the recipe's iteration count)")
    add_recipe_arguments(p, recipe_flag="--purify-recipe", set_flag="--purify-set", config_flag=None)
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    return p


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """Every SimulationConfig field from its flag (the flag's name is the field's, in kebab-case, as
    the `flwr run` config's keys), through the one typed constructor."""
    values = dict(vars(args))
    values["attack_from_round"], values["attack_until_round"] = values.pop("attack_rounds")
    return SimulationConfig.from_values({name: values[name] for name in SimulationConfig.field_names()})


def prepare_out_dir(out: Optional[str]) -> Path:
    from federated.run_folder import fresh_run_dir

    path = Path(out) if out else fresh_run_dir()
    writable_destination(path / "config.json")   # names the file system takes, a folder one can write in
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--out {path} exists and is not empty")
    return path


def resumed_config(folder: str) -> SimulationConfig:
    """The settings of the run folder to resume (a file from outside: read as hostile)."""
    from defense.modelio import read_json_object

    path = Path(folder) / "config.json"
    if not Path(folder).is_dir() or not path.is_file():
        raise ConfigError(f"--resume {folder}: not a run folder (no config.json)")
    simulation = read_json_object(path, "run config").get("simulation")
    if not isinstance(simulation, dict):
        raise ConfigError(f"--resume {folder}: config.json has no 'simulation' object")
    return SimulationConfig.from_values(simulation)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.out:
        raise ConfigError("--resume continues in the run's own folder; drop --out")
    config = resumed_config(args.resume) if args.resume else config_from_args(args)
    recipe = recipe_from_args(args, {"seed": config.seed}) if not args.no_purify else None
    from defense.data import load_dataset

    bundle = load_dataset(config.dataset, config.data_dir, config.image_size)  # fail fast on bad data
    if not 0 <= config.target < bundle.spec.num_classes:
        raise ConfigError(f"--target must be in 0..{bundle.spec.num_classes - 1}, got {config.target}")
    if recipe is not None:
        recipe.validate_for(bundle.spec)
    out = Path(args.resume) if args.resume else prepare_out_dir(args.out)
    from federated.engine import run_federated

    started = time.perf_counter()
    run = run_federated(config, out, bundle.spec, purify=not args.no_purify, purify_every=args.purify_every,
                        purify_budget_s=args.purify_budget, purify_recipe=recipe, quiet=args.quiet,
                        resume=bool(args.resume))
    print(f"run folder: {out}  ({time.perf_counter() - started:.0f} s)")
    if not run.complete:
        print(f"python -m federated.simulate: error: the run is incomplete: {run.failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, "python -m federated.simulate")
