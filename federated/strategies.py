"""--aggregation NAME -> one of Flower's own strategies (no home-made copies), in a registry, and
`ObservedStrategy`, a transparent wrapper that records who trained, who failed and who attacked."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian,
                                     FedTrimmedAvg, Krum, MultiKrum, Strategy)

import logging

from defense.registry import Registry
from federated.validation import validate_update

LOG = logging.getLogger("federated.strategies")

if TYPE_CHECKING:
    from federated.config import SimulationConfig

StrategyFactory = Callable[["SimulationConfig"], Strategy]
AGGREGATIONS: Registry[StrategyFactory] = Registry("aggregation")


def _every_client(config: "SimulationConfig") -> dict:
    # Round 1 samples before all nodes registered: ask for all of them or only 2 would train.
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.clients,
                min_available_nodes=config.clients, min_evaluate_nodes=0)


@AGGREGATIONS.register("fedavg")
def fedavg(config: "SimulationConfig") -> Strategy:
    return FedAvg(**_every_client(config))


@AGGREGATIONS.register("krum")
def krum(config: "SimulationConfig") -> Strategy:
    return Krum(num_malicious_nodes=config.malicious, **_every_client(config))


@AGGREGATIONS.register("multikrum")
def multikrum(config: "SimulationConfig") -> Strategy:
    return MultiKrum(num_malicious_nodes=config.malicious, num_nodes_to_select=config.clients - config.malicious,
                     **_every_client(config))


@AGGREGATIONS.register("bulyan")
def bulyan(config: "SimulationConfig") -> Strategy:
    return Bulyan(num_malicious_nodes=config.malicious, **_every_client(config))


@AGGREGATIONS.register("median")
def median(config: "SimulationConfig") -> Strategy:
    return FedMedian(**_every_client(config))


@AGGREGATIONS.register("trimmed-mean")
def trimmed_mean(config: "SimulationConfig") -> Strategy:
    return FedTrimmedAvg(beta=config.trimmed_beta, **_every_client(config))


@AGGREGATIONS.register("clip")
def clip(config: "SimulationConfig") -> Strategy:
    """Server-side norm clipping of updates (Flower's DP wrapper with zero noise)."""
    return DifferentialPrivacyServerSideFixedClipping(FedAvg(**_every_client(config)), noise_multiplier=0.0,
                                                      clipping_norm=config.clip_norm,
                                                      num_sampled_clients=config.clients)


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


class ObservedStrategy(DelegatingStrategy):
    """Validates every update before aggregation (federated/validation.py), hands the valid ones to
    the inner strategy in a fixed order (by client id, so aggregation is deterministic), and records
    per round how many clients replied, failed, were rejected and trained maliciously."""

    def __init__(self, inner: Strategy, max_relative_norm: float = float("inf")) -> None:
        super().__init__(inner)
        self.max_relative_norm = max_relative_norm
        self.rounds: dict[int, dict[str, int]] = {}
        self.rejections: list[dict] = []
        self._reference: dict = {}

    def expect(self, arrays: ArrayRecord) -> None:
        """The global model the next replies must be updates of."""
        self._reference = {k: arrays[k].numpy() for k in arrays.keys()}

    def configure_train(self, server_round, arrays, config, grid):
        self.expect(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok, rejected = [], 0
        for message in replies:
            if message.has_error():
                continue
            reason = validate_update(message.content, self._reference, self.max_relative_norm)
            if reason is None:
                ok.append(message)
                continue
            rejected += 1
            node = getattr(getattr(message, "metadata", None), "src_node_id", None)
            self.rejections.append({"round": server_round, "node": node, "reason": reason})
            LOG.warning("round %d: rejected the update of node %s: %s", server_round, node, reason)
        ok.sort(key=_client_id)
        self.rounds[server_round] = {
            "clients_trained": len(ok),
            "client_failures": sum(1 for m in replies if m.has_error()),
            "updates_rejected": rejected,
            "malicious_clients": sum(int(m.content["metrics"].get("malicious", 0)) for m in ok),
        }
        if not ok:
            return None, None
        return self.inner.aggregate_train(server_round, ok)


def _client_id(message: Message) -> float:
    try:
        return float(message.content["metrics"]["client-id"])
    except Exception:
        return float("inf")
