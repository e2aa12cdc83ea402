"""What a malicious client does: poison its own partition, optionally keep its update off the
coordinates benign training moves (Neurotoxin) or re-optimise its patch against the global model
every round (A3FL), and optionally boost its update."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

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
                     client_id: int, trigger: Optional[Trigger] = None) -> Split:
    """The attacker's partition with its trigger pasted on a share of it; `trigger`: this round's
    (A3FL's optimised patch) in place of the attacker's fixed one."""
    trigger = attacker_trigger(config, spec, attacker_rank) if trigger is None else trigger
    return poison(data, trigger, config.poison_rate, config.target, seed=config.seed * 1000 + client_id)[0]


def boost_update(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor],
                 boost: float) -> dict[str, torch.Tensor]:
    """Model replacement (Bagdasaryan et al. 2020): G + boost * (L - G) for floating tensors."""
    return {k: (global_state[k] + boost * (v - global_state[k])) if v.is_floating_point() else v
            for k, v in local_state.items()}


def neurotoxin_mask(global_state: dict[str, torch.Tensor], previous_global: Optional[dict[str, torch.Tensor]],
                    top_k: float) -> Optional[dict[str, torch.Tensor]]:
    """Neurotoxin (Zhang et al., ICML 2022): the coordinates the attacker may change, True where the
    last global update (the benign clients' aggregate, seen as the change between the last two global
    models this client received) is *not* among the `top_k` share of largest magnitudes, over all
    floating tensors together. None without a previous global model (the first round it trains)."""
    if previous_global is None:
        return None
    keys = [k for k, v in global_state.items() if v.is_floating_point() and k in previous_global]
    magnitude = torch.cat([(global_state[k] - previous_global[k]).abs().flatten() for k in keys])
    excluded = max(1, int(round(top_k * magnitude.numel())))
    threshold = torch.topk(magnitude, excluded).values[-1]
    return {k: (global_state[k] - previous_global[k]).abs() < threshold for k in keys}


def projection(global_state: dict[str, torch.Tensor], allowed: dict[str, torch.Tensor]) -> Callable[[torch.nn.Module], None]:
    """After each local step: the weights outside `allowed` back to the global model's (projected
    gradient descent onto the attacker's coordinates)."""
    def project(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name in allowed:
                    tensor.copy_(torch.where(allowed[name], tensor, global_state[name]))
    return project


def a3fl_trigger(global_model: torch.nn.Module, data: Split, base: PatchTrigger, target: int, steps: int,
                 adversary_steps: int, step_size: float, seed: int) -> PatchTrigger:
    """A3FL (Zhang et al., NeurIPS 2023): the patch's pixel values re-optimised against the global model
    the attacker received, and against an adversarially adapted copy of it (a few SGD steps that teach
    the copy the true labels of triggered images, as benign training would), so that the trigger
    outlives the benign rounds. Signed-gradient steps of `step_size` on the values, kept in [0, 1];
    one adaptation every step. Deterministic in its inputs: every attacker (and the experimenter, who
    measures ASR with it) computes the same trigger from the same global model and data."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.images, data.labels
    keep = labels != target
    images, labels = images[keep], labels[keep]
    was_training = global_model.training
    global_model.eval()
    adversary = copy.deepcopy(global_model).train()
    adversary_optimiser = torch.optim.SGD(adversary.parameters(), lr=0.01)
    values = base.pattern.clone().clamp(0, 1)
    wanted = torch.full((len(images),), target, dtype=torch.long)
    try:
        for _ in range(steps):
            batch = torch.randperm(len(images), generator=generator)[:64]
            for _ in range(adversary_steps):   # the benign side: the trigger's images with their true labels
                stamped = dataclasses.replace(base, pattern=values).paste(images[batch])
                loss = F.cross_entropy(adversary(stamped), labels[batch])
                adversary_optimiser.zero_grad(set_to_none=True)
                loss.backward()
                adversary_optimiser.step()
            adversary.eval()
            values.requires_grad_(True)
            stamped = dataclasses.replace(base, pattern=values).paste(images[batch])
            loss = F.cross_entropy(global_model(stamped), wanted[batch])
            if adversary_steps:
                loss = loss + F.cross_entropy(adversary(stamped), wanted[batch])
            gradient, = torch.autograd.grad(loss, values)
            values = (values.detach() - step_size * gradient.sign()).clamp(0, 1)
            adversary.train()
    finally:
        global_model.train(was_training)
    return dataclasses.replace(base, pattern=values.detach())
