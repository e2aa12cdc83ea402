"""The simulation's typed, validated configuration (built from the command line)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np

from defense.spec import require

AGGREGATIONS = ("fedavg", "krum", "multikrum", "bulyan", "median", "trimmed-mean", "clip")
PARTITIONS = ("iid", "dirichlet")
MAX_CLIENTS = 100_000
WEIGHTINGS = ("known", "equal")   # client aggregation weights (federated.validation.ReplyChecker)


@dataclass(frozen=True)
class SimulationConfig:
    clients: int = 10
    malicious: int = 2
    rounds: int = 20
    local_epochs: int = 2
    local_lr: float = 0.05
    local_batch_size: int = 32
    seed: int = 0
    dataset: str = "digits"
    data_dir: Optional[str] = None
    image_size: int = 16
    model: str = "small-cnn"
    partition: str = "iid"
    alpha: float = 0.5
    attack: str = "badnets"
    trigger_size: int = 3
    trigger_place: str = "corner"    # patch attacks: corner (bottom-right), centre, random (per sample)
    target: int = 0
    poison_rate: float = 0.5
    attack_from_round: int = 1       # attackers poison from this round on (1 = all rounds)
    boost: float = 1.0               # model-replacement scaling of malicious updates (1 = none)
    blend_alpha: float = 0.2
    aggregation: str = "fedavg"
    trimmed_beta: float = 0.2
    clip_norm: float = 1.0
    cpus_per_client: float = 1.0
    max_update_norm: float = 10.0    # reject updates with ||L - G|| > this x ||G||
    client_weighting: str = "known"  # aggregation weights: known (num-examples capped at the partition
                                     # size the server assigned) or equal (every accepted reply weight 1)
    round_timeout_s: float = 600.0   # a client slower than this counts as failed
    node_wait_s: float = 120.0       # how long the server waits for all clients' nodes to connect
    client_failure_rate: float = 0.0 # injected fault: this fraction of clients raise every round

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            require(not isinstance(value, float) or math.isfinite(value), f"{name} must be finite, got {value}")
        require(self.clients <= MAX_CLIENTS, f"--clients must be at most {MAX_CLIENTS}, got {self.clients}")
        require(self.rounds <= 100_000, f"--rounds must be at most 100000, got {self.rounds}")
        require(self.local_epochs <= 10_000, f"--local-epochs must be at most 10000, got {self.local_epochs}")
        require(1 <= self.local_batch_size <= 65_536, f"--local-batch-size must be in 1..65536, got {self.local_batch_size}")
        require(0 <= self.seed < 2**31, f"--seed must be in 0..{2**31 - 1}, got {self.seed}")
        require(self.clients >= 2, f"--clients must be >= 2, got {self.clients}")
        require(0 <= self.malicious <= self.clients, f"--malicious must be in 0..{self.clients} (--clients), got {self.malicious}")
        require(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        require(self.local_epochs >= 1, f"--local-epochs must be >= 1, got {self.local_epochs}")
        require(self.local_lr > 0, f"--local-lr must be > 0, got {self.local_lr}")
        require(self.partition in PARTITIONS, f"--partition must be one of {', '.join(PARTITIONS)}")
        require(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        require(1 <= self.trigger_size <= 7, f"--trigger-size must be in 1..7, got {self.trigger_size}")
        require(0 <= self.poison_rate <= 1, f"--poison-rate must be in [0, 1], got {self.poison_rate}")
        require(self.attack_from_round >= 1, f"--attack-rounds must start at round >= 1, got {self.attack_from_round}")
        require(self.boost >= 1, f"--boost must be >= 1, got {self.boost}")
        require(self.aggregation in AGGREGATIONS, f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        require(0 < self.trimmed_beta < 0.5, f"--trimmed-beta must be in (0, 0.5), got {self.trimmed_beta}")
        require(self.clip_norm > 0, f"--clip-norm must be > 0, got {self.clip_norm}")
        require(self.cpus_per_client > 0, f"cpus per client must be > 0, got {self.cpus_per_client}")
        require(self.max_update_norm > 0, f"--max-update-norm must be > 0, got {self.max_update_norm}")
        require(self.client_weighting in WEIGHTINGS,
                f"--client-weighting must be one of {', '.join(WEIGHTINGS)}, got {self.client_weighting!r}")
        require(0 < self.node_wait_s <= 86_400, f"--node-wait must be in (0, 86400] s, got {self.node_wait_s}")
        require(self.round_timeout_s > 0, f"--round-timeout must be > 0, got {self.round_timeout_s}")
        require(0 <= self.client_failure_rate < 1, f"client failure rate must be in [0, 1), got {self.client_failure_rate}")
        require(4 <= self.image_size <= 512, f"--image-size must be in 4..512, got {self.image_size}")
        f, n = self.malicious, self.clients
        if self.aggregation in ("krum", "multikrum"):
            require(n > 2 * f + 2, f"--aggregation {self.aggregation} needs clients > 2*malicious + 2 ({n} <= {2 * f + 2})")
        if self.aggregation == "bulyan":
            require(n >= 4 * f + 3, f"--aggregation bulyan needs clients >= 4*malicious + 3 ({n} < {4 * f + 3})")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "SimulationConfig":
        """The one constructor from strings / JSON values (CLI, `flwr run` config): every name and
        value checked, then validated."""
        from defense.fields import coerce_fields

        return cls(**coerce_fields(cls, values, "simulation"))

    def malicious_clients(self) -> list[int]:
        """Which partition ids attack: a fixed, seeded draw decided by the server."""
        rng = np.random.default_rng(self.seed + 7919)
        return sorted(int(i) for i in rng.choice(self.clients, size=self.malicious, replace=False))

    def attackers_in_round(self, server_round: int) -> frozenset[int]:
        """The partition ids that poison in `server_round`: the experimenter's ground truth."""
        return frozenset(self.malicious_clients()) if server_round >= self.attack_from_round else frozenset()

    def experiment(self) -> "Experiment":
        """The record of this run's attack, written into every model file of the run (poison rate 0
        when no client attacks: nothing was planted)."""
        from defense.experiment import Experiment

        return Experiment(dataset=self.dataset, image_size=self.image_size, attack=self.attack,
                          trigger_size=self.trigger_size, place=self.trigger_place,
                          blend_alpha=self.blend_alpha, trigger_seed=self.seed,
                          target=self.target, poison_rate=self.poison_rate if self.malicious else 0.0,
                          written_by="federated.simulate")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
