"""The Flower apps: a ClientApp (benign or malicious by partition id) and a ServerApp that runs a
strategy, evaluates the global model every round and writes the run folder."""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from defense.data import DataBundle, Split, load_dataset
from defense.experiment import Experiment
from defense.metrics import evaluate_backdoor
from defense.models import build_model
from defense.training import TrainConfig, train_classifier
from defense.triggers import PatchTrigger, Trigger
from federated.attacks import a3fl_trigger, boost_update, global_trigger, neurotoxin_mask, poison_partition, projection
from federated.config import SimulationConfig
from federated.partition import partition
from federated.run_folder import RunFolder
from federated.strategies import MissingNodes, ObservedStrategy, OffsetRounds, build_strategy
from federated.validation import ReplyChecker

SKIPPED_STATE = "num_batches_tracked"  # integer counters: not averaged, not exchanged


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith(SKIPPED_STATE)})


def arrays_to_model(model: torch.nn.Module, arrays: ArrayRecord) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    bad = [k for k in missing if not k.endswith(SKIPPED_STATE)] + list(unexpected)
    if bad:
        raise ValueError(f"arrays do not fit the model: {bad[:3]}")
    return model


@functools.lru_cache(maxsize=4)
def load_bundle(dataset: str, data_dir: Optional[str], image_size: int) -> DataBundle:
    return load_dataset(dataset, data_dir, image_size)


@functools.lru_cache(maxsize=64)
def client_data(config: SimulationConfig, client_id: int, poisoned: bool) -> Split:
    bundle = load_bundle(config.dataset, config.data_dir, config.image_size)
    index = partition(config.partition, bundle.train.labels, config.clients, config.alpha, config.seed)[client_id]
    data = Split(bundle.train.images[index], bundle.train.labels[index])
    if poisoned:
        rank = config.malicious_clients().index(client_id)
        data = poison_partition(data, config, bundle.spec, rank, client_id)
    return data


def make_client_app(config: SimulationConfig) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_client(config, msg, context)

    return app


def train_client(config: SimulationConfig, msg: Message, context: Context) -> Message:
    """One client's round: benign local training, or poisoning (and boosting) when it attacks."""
    torch.set_num_threads(1)
    attackers = set(config.malicious_clients())
    client_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if config.client_failure_rate > 0:  # injected fault (reliability tests)
        draw = np.random.default_rng([config.seed, server_round, client_id]).random()
        if draw < config.client_failure_rate:
            raise RuntimeError(f"injected failure of client {client_id} in round {server_round}")
    attacking = client_id in config.attackers_in_round(server_round)
    spec = load_bundle(config.dataset, config.data_dir, config.image_size).spec
    model = arrays_to_model(build_model(config.model, spec), msg.content["arrays"])
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    if attacking and config.attacker == "a3fl":   # this round's trigger, optimised on the model received
        trigger = round_trigger(config, model, spec, server_round)
        data = poison_partition(client_data(config, client_id, False), config, spec,
                                config.malicious_clients().index(client_id), client_id, trigger)
    else:
        data = client_data(config, client_id, attacking)
    seed = config.seed * 1_000_003 + server_round * 1_009 + client_id
    after_step = None
    if config.attacker == "neurotoxin" and client_id in attackers:
        after_step = neurotoxin_step(config, context, global_state, attacking)
    train_classifier(model, data, TrainConfig(epochs=config.local_epochs, batch_size=config.local_batch_size,
                                              lr=config.local_lr, seed=seed), cosine=False, after_step=after_step)
    if attacking and config.boost != 1.0:
        model.load_state_dict(boost_update(global_state, model.state_dict(), config.boost))
    reply = RecordDict({
        "arrays": model_to_arrays(model),
        "metrics": MetricRecord({"num-examples": len(data), "client-id": client_id}),
    })
    return Message(content=reply, reply_to=msg)


def round_trigger(config: SimulationConfig, global_model: torch.nn.Module, spec, server_round: int) -> PatchTrigger:
    """A3FL's trigger of `server_round`, from the global model sent in that round: the attackers collude
    (one trigger, optimised on their clean partitions together), and the experimenter recomputes it
    to measure ASR. One thread, so that every process computes the same values."""
    base = global_trigger(config, spec)
    assert isinstance(base, PatchTrigger)
    parts = [client_data(config, client_id, False) for client_id in config.malicious_clients()]
    data = Split(torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return a3fl_trigger(global_model, data, base, config.target, config.a3fl_steps, config.a3fl_adversary_steps,
                            config.a3fl_step_size, seed=config.seed * 1_009 + server_round)
    finally:
        torch.set_num_threads(threads)


NEUROTOXIN_STATE = "neurotoxin-last-global"


def neurotoxin_step(config: SimulationConfig, context: Context, global_state: dict, attacking: bool):
    """A Neurotoxin attacker remembers every global model it receives (in its node's context state);
    when it attacks, its local steps are projected off the coordinates the last global update moved most."""
    previous = context.state.array_records.get(NEUROTOXIN_STATE)
    previous_state = previous.to_torch_state_dict() if previous is not None else None
    context.state[NEUROTOXIN_STATE] = ArrayRecord({k: v.clone() for k, v in global_state.items()
                                                   if not k.endswith(SKIPPED_STATE)})
    if not attacking:
        return None
    allowed = neurotoxin_mask(global_state, previous_state, config.neurotoxin_top_k)
    return projection(global_state, allowed) if allowed is not None else None


def reply_checker(config: SimulationConfig, bundle: DataBundle) -> ReplyChecker:
    """The server's check of client replies, with the partition sizes it assigned itself."""
    sizes = [len(index) for index in partition(config.partition, bundle.train.labels, config.clients,
                                               config.alpha, config.seed)]
    return ReplyChecker(config.clients, config.max_update_norm, config.client_weighting, sizes)


def make_server_app(config: SimulationConfig, run: RunFolder,
                    wrap_strategy: Callable[[Strategy], Strategy] = lambda s: s,
                    start: Optional[ArrayRecord] = None) -> ServerApp:
    """`wrap_strategy` lets a caller (the purification hook of deploy/) wrap the chosen strategy."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config, run, wrap_strategy, start)

    return app


def serve(grid: Grid, config: SimulationConfig, run: RunFolder,
          wrap_strategy: Callable[[Strategy], Strategy] = lambda s: s, start: Optional[ArrayRecord] = None) -> None:
    """The server's run: the chosen strategy for `config.rounds` rounds, evaluating the global model
    every round into `run`, then the final model. `start`: a resumed run's global model after the
    rounds already in `run` (the run goes on from the next round)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    bundle = load_bundle(config.dataset, config.data_dir, config.image_size)
    # the run's record names the trigger ASR is measured with (A3FL's latest, on a resumed run)
    trigger: Trigger = Experiment.from_dict(run.experiment).trigger(bundle.spec) if run.experiment else \
        global_trigger(config, bundle.spec)
    torch.manual_seed(config.seed)
    model = build_model(config.model, bundle.spec)
    sent = start   # the global model sent in the round being evaluated (set by each evaluation)
    observed = ObservedStrategy(build_strategy(config), reply_checker(config, bundle), config.attackers_in_round,
                                node_wait_s=config.node_wait_s, sample=config.sample, seed=config.seed)
    strategy = wrap_strategy(observed)
    done = len(run.rows) if start is not None else 0
    if done:
        strategy = OffsetRounds(strategy, done)
    started = time.perf_counter()
    run.start_rounds()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal trigger, sent
        server_round += done if server_round > 0 else 0
        if config.attacker == "a3fl" and server_round > 0 and sent is not None and \
                observed.rounds.get(server_round, {}).get("malicious_clients"):
            trigger = round_trigger(config, arrays_to_model(model, sent), bundle.spec, server_round)
            run.experiment = {**(run.experiment or config.experiment().to_dict()),
                              "patch_values": trigger.pattern.flatten().tolist()}
        sent = arrays
        arrays_to_model(model, arrays)
        metrics = evaluate_backdoor(model, bundle.test, trigger, config.target)
        if server_round > 0:
            row = {"round": server_round, **metrics, **observed.rounds.get(server_round, {}),
                   "wall_time_s": time.perf_counter() - started}
            run.record_round(row, model)
        return MetricRecord({k: float(v) for k, v in metrics.items() if v is not None})

    try:
        initial = start if start is not None else model_to_arrays(model)
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=config.rounds - done,
                                train_config=ConfigRecord({"local-epochs": config.local_epochs}),
                                evaluate_fn=evaluate, timeout=config.round_timeout_s)
    except MissingNodes as missing:
        run.failure = str(missing)
        return
    run.write_rejections(observed.rejections)
    if not any(counts.get("clients_trained") for counts in observed.rounds.values()) or not len(result.arrays):
        failures = sum(counts.get("client_failures", 0) for counts in observed.rounds.values())
        rejected = sum(counts.get("updates_rejected", 0) for counts in observed.rounds.values())
        run.failure = (f"no round aggregated any client update ({failures} client failures, {rejected} rejected "
                       f"replies over {len(observed.rounds)} rounds; see rejected_updates.json); no final model")
        return
    arrays_to_model(model, result.arrays)
    run.save_final(model)

