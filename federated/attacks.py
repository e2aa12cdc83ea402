"""What a malicious client does: poison its own partition, and optionally boost its update."""
from __future__ import annotations

import torch

from defense.data import Split
from defense.spec import InputSpec
from defense.triggers import PatchTrigger, Trigger, poison
from federated.config import SimulationConfig


def global_trigger(config: SimulationConfig, spec: InputSpec) -> Trigger:
    """The trigger used at test time (for DBA: the full, assembled trigger): the run's experiment record's."""
    return config.experiment().trigger(spec)


def attacker_trigger(config: SimulationConfig, spec: InputSpec, attacker_rank: int) -> Trigger:
    """The trigger one attacker pastes: DBA splits the global patch into one band per attacker."""
    trigger = global_trigger(config, spec)
    if config.attack == "dba":
        assert isinstance(trigger, PatchTrigger)
        return trigger.part(attacker_rank, min(config.malicious, config.trigger_size))
    return trigger


def poison_partition(data: Split, config: SimulationConfig, spec: InputSpec, attacker_rank: int,
                     client_id: int) -> Split:
    trigger = attacker_trigger(config, spec, attacker_rank)
    return poison(data, trigger, config.poison_rate, config.target, seed=config.seed * 1000 + client_id)[0]


def boost_update(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor],
                 boost: float) -> dict[str, torch.Tensor]:
    """Model replacement (Bagdasaryan et al. 2020): G + boost * (L - G) for floating tensors."""
    return {k: (global_state[k] + boost * (v - global_state[k])) if v.is_floating_point() else v
            for k, v in local_state.items()}
