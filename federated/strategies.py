"""--aggregation NAME -> one of Flower's own strategies (no home-made copies), in a registry, and
`ObservedStrategy`, a transparent wrapper that records who trained, who failed and who attacked."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian,
                                     FedTrimmedAvg, Krum, MultiKrum, Strategy)

import logging
import time

import numpy as np

from defense.registry import Registry
from federated.validation import RejectedReply, ReplyChecker

LOG = logging.getLogger("federated.strategies")

if TYPE_CHECKING:
    from federated.config import SimulationConfig

StrategyFactory = Callable[["SimulationConfig"], Strategy]
AGGREGATIONS: Registry[StrategyFactory] = Registry("aggregation")


def _every_client(config: "SimulationConfig") -> dict:
    # Round 1 samples before all nodes registered: ask for all of them or only 2 would train. With
    # --sample, ObservedStrategy keeps a seeded draw of the messages (the same draw for every strategy).
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.clients,
                min_available_nodes=config.clients, min_evaluate_nodes=0)


def _malicious_per_round(config: "SimulationConfig") -> int:
    return min(config.malicious, config.clients_per_round)


@AGGREGATIONS.register("fedavg")
def fedavg(config: "SimulationConfig") -> Strategy:
    return FedAvg(**_every_client(config))


@AGGREGATIONS.register("krum")
def krum(config: "SimulationConfig") -> Strategy:
    return Krum(num_malicious_nodes=_malicious_per_round(config), **_every_client(config))


@AGGREGATIONS.register("multikrum")
def multikrum(config: "SimulationConfig") -> Strategy:
    return MultiKrum(num_malicious_nodes=_malicious_per_round(config),
                     num_nodes_to_select=config.clients_per_round - _malicious_per_round(config),
                     **_every_client(config))


@AGGREGATIONS.register("bulyan")
def bulyan(config: "SimulationConfig") -> Strategy:
    return Bulyan(num_malicious_nodes=_malicious_per_round(config), **_every_client(config))


@AGGREGATIONS.register("median")
def median(config: "SimulationConfig") -> Strategy:
    return FedMedian(**_every_client(config))


@AGGREGATIONS.register("trimmed-mean")
def trimmed_mean(config: "SimulationConfig") -> Strategy:
    return FedTrimmedAvg(beta=config.trimmed_beta, **_every_client(config))


def _server_side_clipping(config: "SimulationConfig", noise_multiplier: float) -> Strategy:
    """FedAvg behind Flower's server-side fixed clipping: updates clipped to --clip-norm, Gaussian noise
    of std noise_multiplier x --clip-norm / clients per round added to the sum."""
    return DifferentialPrivacyServerSideFixedClipping(FedAvg(**_every_client(config)), noise_multiplier=noise_multiplier,
                                                      clipping_norm=config.clip_norm,
                                                      num_sampled_clients=config.clients_per_round)


@AGGREGATIONS.register("clip")
def clip(config: "SimulationConfig") -> Strategy:
    """Server-side norm clipping of updates (Flower's DP wrapper with zero noise)."""
    return _server_side_clipping(config, 0.0)


@AGGREGATIONS.register("dp")
def dp(config: "SimulationConfig") -> Strategy:
    """Server-side differential privacy: clipping plus noise of --dp-noise."""
    return _server_side_clipping(config, config.dp_noise)


@AGGREGATIONS.register("flame")
def flame(config: "SimulationConfig") -> Strategy:
    """FLAME (Nguyen et al. 2022): HDBSCAN over cosine distances, median-norm clipping, noise."""
    from federated.defences import Flame

    return Flame(noise=config.flame_noise, seed=config.seed, **_every_client(config))


@AGGREGATIONS.register("foolsgold")
def foolsgold(config: "SimulationConfig") -> Strategy:
    """FoolsGold (Fung et al. 2020): client weights from the similarity of their update histories."""
    from federated.defences import FoolsGold

    return FoolsGold(kappa=config.foolsgold_kappa, seed=config.seed, **_every_client(config))


@AGGREGATIONS.register("rlr")
def rlr(config: "SimulationConfig") -> Strategy:
    """Robust learning rate (Ozdayi et al. 2021): the sign of the server's learning rate per coordinate."""
    from federated.defences import RobustLR

    return RobustLR(threshold=config.rlr_threshold, seed=config.seed, **_every_client(config))


def build_strategy(config: "SimulationConfig") -> Strategy:
    return AGGREGATIONS.get(config.aggregation)(config)


class DelegatingStrategy(Strategy):
    """Forwards every call to `inner`; subclasses override the steps they watch or change."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class OffsetRounds(DelegatingStrategy):
    """A resumed run: Flower's `start` counts rounds from 1, the run goes on from round `offset` + 1,
    so every round number reaching the wrapped strategies (and through them the clients' config,
    the attack window and every seed drawn per round) is shifted by `offset`."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


class MissingNodes(RuntimeError):
    """Fewer nodes than the run's clients connected within the wait."""


def wait_for_nodes(grid: Grid, needed: int, wait_s: float, poll_s: float = 0.5) -> None:
    """Flower's strategies wait for ever (and silently, at our log level) for `min_available_nodes`;
    this waits at most `wait_s`, then stops the run with what is missing and how to set it."""
    deadline, told = time.monotonic() + wait_s, False
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if not told:
            LOG.warning("waiting for nodes: %d of the %d the run needs are connected (at most %.0f s)",
                        connected, needed, wait_s)
            told = True
        if time.monotonic() >= deadline:
            raise MissingNodes(
                f"only {connected} of the {needed} nodes the run needs (clients = {needed}) connected within "
                f"{wait_s:.0f} s. On Flower's simulation runtime give the federation that many SuperNodes "
                f"(`flwr federation simulation-config <federation> --num-supernodes {needed}`), or run with "
                f"`--run-config \"clients={max(connected, 2)}\"`")
        time.sleep(poll_s)


class ObservedStrategy(DelegatingStrategy):
    """Normalises every reply before aggregation (federated/validation.py: the one layout, the
    server's own weights), hands the accepted ones to the inner strategy in a fixed order (by client
    id, so aggregation is deterministic), and records per round how many clients were asked,
    trained, failed, timed out and were rejected, and how many of the accepted ones attacked: that
    ground truth is the simulation's (`attackers`, a callable of the round), never a client's word."""

    def __init__(self, inner: Strategy, checker: ReplyChecker,
                 attackers: Callable[[int], frozenset[int]] = lambda server_round: frozenset(),
                 node_wait_s: float = 120.0, sample: int = 0, seed: int = 0) -> None:
        super().__init__(inner)
        self.node_wait_s = node_wait_s
        self.sample, self.seed = sample, seed
        self.checker = checker
        self.attackers = attackers
        self.rounds: dict[int, dict[str, int]] = {}
        self.rejections: list[dict] = []
        self._asked: dict[int, int] = {}

    def expect(self, arrays: ArrayRecord) -> None:
        """The global model the next replies must be updates of."""
        self.checker.expect(arrays)

    def configure_train(self, server_round, arrays, config, grid):
        self.expect(arrays)
        wait_for_nodes(grid, self.checker.clients, self.node_wait_s)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.sample and self.sample < len(messages):
            # a seeded draw of `sample` of the connected nodes (in node-id order), the same for every strategy
            messages.sort(key=lambda message: message.metadata.dst_node_id)
            picked = np.random.default_rng([self.seed, server_round]).choice(len(messages), self.sample, replace=False)
            messages = [messages[i] for i in sorted(picked)]
        self._asked[server_round] = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        accepted: list[tuple[int, Message]] = []
        rejected = failed = 0
        for message in replies:
            if message.has_error():
                failed += 1
                continue
            node = getattr(getattr(message, "metadata", None), "src_node_id", None)
            try:
                content, client_id = self.checker.normalise(message.content, node)
            except RejectedReply as reason:
                rejected += 1
                self.rejections.append({"round": server_round, "node": node, "reason": str(reason)})
                LOG.warning("round %d: rejected the reply of node %s: %s", server_round, node, reason)
                continue
            message.content = content
            accepted.append((client_id, message))
        accepted.sort(key=lambda pair: pair[0])
        timed_out = max(self._asked.get(server_round, len(replies)) - len(replies), 0)
        attackers = self.attackers(server_round)
        self.rounds[server_round] = {
            "clients_sampled": self._asked.get(server_round, len(replies)),
            "clients_trained": len(accepted),
            "client_failures": failed + timed_out,
            "client_timeouts": timed_out,
            "updates_rejected": rejected,
            "malicious_clients": sum(1 for client_id, _ in accepted if client_id in attackers),
        }
        if not accepted:
            return None, None
        result = self.inner.aggregate_train(server_round, [message for _, message in accepted])
        if hasattr(self.inner, "excluded"):   # an in-training defence that gives some updates no weight
            excluded = set(self.inner.excluded.get(server_round, ()))
            self.rounds[server_round]["updates_excluded"] = len(excluded)
            self.rounds[server_round]["malicious_excluded"] = len(excluded & attackers)
        return result
