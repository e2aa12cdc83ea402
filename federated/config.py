"""The simulation's typed, validated configuration (built from the command line)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np

from defense.spec import require
from defense.triggers import PATTERNS
from defense.errors import shown

AGGREGATIONS = ("fedavg", "krum", "multikrum", "bulyan", "median", "trimmed-mean", "clip", "dp", "flame",
                "foolsgold", "rlr")
PARTITIONS = ("iid", "dirichlet")
ATTACKERS = ("plain", "neurotoxin", "a3fl")   # how a malicious client poisons (federated/attacks.py)
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
    trigger_pattern: str = "checkerboard"  # patch attacks: checkerboard, tri1, white (defense.triggers.PATTERNS)
    target: int = 0
    poison_rate: float = 0.5
    attack_from_round: int = 1       # attackers poison from this round on (1 = all rounds)
    attack_until_round: int = 0      # ... up to and including this round (0 = to the last round)
    attacker: str = "plain"          # plain poisoning, or neurotoxin (Zhang et al. 2022)
    neurotoxin_top_k: float = 0.01   # neurotoxin: share of coordinates (largest last global update) left alone
    a3fl_steps: int = 30             # a3fl: signed-gradient steps on the patch's values per attack round
    a3fl_adversary_steps: int = 1    # a3fl: SGD steps of the adapted (trigger-unlearning) model per trigger step
    a3fl_step_size: float = 0.03     # a3fl: size of one step on the patch's values (pixels in [0, 1])
    sample: int = 0                  # clients trained per round (0 = every registered client)
    boost: float = 1.0               # model-replacement scaling of malicious updates (1 = none)
    blend_alpha: float = 0.2
    aggregation: str = "fedavg"
    trimmed_beta: float = 0.2
    clip_norm: float = 1.0
    dp_noise: float = 0.1            # --aggregation dp: noise multiplier (std = this x clip_norm / clients)
    flame_noise: float = 0.001       # --aggregation flame: noise std = this x the median update norm (paper: 0.001)
    foolsgold_kappa: float = 1.0     # --aggregation foolsgold: the logit's confidence (paper: 1)
    rlr_threshold: int = 4           # --aggregation rlr: clients that must agree on a coordinate's sign (paper: 4)
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
        require(self.attack_until_round == 0 or self.attack_until_round >= self.attack_from_round,
                f"--attack-rounds K:L needs L >= K, got {self.attack_from_round}:{self.attack_until_round}")
        require(self.attacker in ATTACKERS, f"--attacker must be one of {', '.join(ATTACKERS)}, got {shown(self.attacker)}")
        require(0 < self.neurotoxin_top_k < 1, f"--neurotoxin-top-k must be in (0, 1), got {self.neurotoxin_top_k}")
        require(self.attacker != "a3fl" or self.attack == "badnets",
                f"--attacker a3fl optimises a patch: it needs --attack badnets, got {self.attack}")
        require(1 <= self.a3fl_steps <= 10_000, f"--a3fl-steps must be in 1..10000, got {self.a3fl_steps}")
        require(0 <= self.a3fl_adversary_steps <= 100, f"--a3fl-adversary-steps must be in 0..100, got {self.a3fl_adversary_steps}")
        require(0 < self.a3fl_step_size <= 1, f"--a3fl-step-size must be in (0, 1], got {self.a3fl_step_size}")
        require(0 <= self.sample <= self.clients, f"--sample must be in 0..{self.clients} (--clients), got {self.sample}")
        require(self.sample == 0 or self.sample >= 2, f"--sample must be >= 2 (or 0: every client), got {self.sample}")
        require(self.trigger_pattern in PATTERNS,
                f"--trigger-pattern must be one of {', '.join(PATTERNS)}, got {shown(self.trigger_pattern)}")
        require(self.boost >= 1, f"--boost must be >= 1, got {self.boost}")
        require(self.aggregation in AGGREGATIONS, f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        require(0 < self.trimmed_beta < 0.5, f"--trimmed-beta must be in (0, 0.5), got {self.trimmed_beta}")
        require(self.clip_norm > 0, f"--clip-norm must be > 0, got {self.clip_norm}")
        require(0 <= self.dp_noise <= 100, f"--dp-noise must be in [0, 100], got {self.dp_noise}")
        require(0 <= self.flame_noise <= 1, f"--flame-noise must be in [0, 1], got {self.flame_noise}")
        require(0 < self.foolsgold_kappa <= 100, f"--foolsgold-kappa must be in (0, 100], got {self.foolsgold_kappa}")
        require(self.rlr_threshold >= 1, f"--rlr-threshold must be >= 1, got {self.rlr_threshold}")
        if self.aggregation == "rlr":
            require(self.rlr_threshold <= self.clients_per_round,
                    f"--rlr-threshold must be at most the clients per round ({self.clients_per_round}), got {self.rlr_threshold}")
        require(self.cpus_per_client > 0, f"cpus per client must be > 0, got {self.cpus_per_client}")
        require(self.max_update_norm > 0, f"--max-update-norm must be > 0, got {self.max_update_norm}")
        require(self.client_weighting in WEIGHTINGS,
                f"--client-weighting must be one of {', '.join(WEIGHTINGS)}, got {shown(self.client_weighting)}")
        require(0 < self.node_wait_s <= 86_400, f"--node-wait must be in (0, 86400] s, got {self.node_wait_s}")
        require(self.round_timeout_s > 0, f"--round-timeout must be > 0, got {self.round_timeout_s}")
        require(0 <= self.client_failure_rate < 1, f"client failure rate must be in [0, 1), got {self.client_failure_rate}")
        require(4 <= self.image_size <= 512, f"--image-size must be in 4..512, got {self.image_size}")
        f, n = min(self.malicious, self.clients_per_round), self.clients_per_round
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
        in_window = server_round >= self.attack_from_round and (
            not self.attack_until_round or server_round <= self.attack_until_round)
        return frozenset(self.malicious_clients()) if in_window else frozenset()

    def last_attack_round(self) -> int:
        """The last round in which attackers poison (0: no attacker, or the window starts after the run)."""
        if not self.malicious or self.attack_from_round > self.rounds:
            return 0
        return min(self.attack_until_round or self.rounds, self.rounds)

    @property
    def clients_per_round(self) -> int:
        return self.sample or self.clients

    def experiment(self) -> "Experiment":
        """The record of this run's attack, written into every model file of the run (poison rate 0
        when no client attacks: nothing was planted)."""
        from defense.experiment import Experiment

        return Experiment(dataset=self.dataset, image_size=self.image_size, attack=self.attack,
                          trigger_size=self.trigger_size, place=self.trigger_place, pattern=self.trigger_pattern,
                          blend_alpha=self.blend_alpha, trigger_seed=self.seed,
                          target=self.target, poison_rate=self.poison_rate if self.malicious else 0.0,
                          written_by="federated.simulate")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
