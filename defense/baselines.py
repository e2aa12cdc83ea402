"""Baseline defences beside DHBE, in one registry with one interface:

    defend(model, spec, clean, config) -> purified copy of the model

`clean` is the server's small clean set (None for data-free defences); each entry states its data
budget. Data-free: DHBE, plain adversarial distillation (DHBE with lambda = 0), CLP. With a clean set:
fine-tuning, fine-pruning, NAD and NFT."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from defense.data import Split
from defense.dhbe import Recipe, cpu_recipe, plain_adversarial_distillation, purify
from defense.registry import Registry
from defense.spec import InputSpec, require
from defense.training import TrainConfig, train_classifier
from defense.errors import shown


@dataclass(frozen=True)
class DefenceConfig:
    seed: int = 0
    dhbe: Optional[Recipe] = None          # None: the CPU recipe
    clp_threshold: float = 3.0             # CLP's u
    finetune_epochs: int = 20
    finetune_lr: float = 0.01
    prune_ratio: float = 0.2               # fine-pruning: fraction of last-block channels pruned
    nad_beta: float = 1000.0               # NAD attention-loss weight
    nft_iterations: int = 300
    nft_lr: float = 0.05
    nft_mask_weight: float = 0.1           # keeps masks near 1

    def __post_init__(self) -> None:
        require(self.clp_threshold > 0, "clp_threshold must be > 0")
        require(0 < self.prune_ratio < 1, "prune_ratio must be in (0, 1)")
        require(self.finetune_epochs >= 1 and self.nft_iterations >= 1, "epochs/iterations must be >= 1")


@dataclass(frozen=True)
class Defence:
    name: str
    needs_clean_data: bool
    run: Callable[[nn.Module, InputSpec, Optional[Split], DefenceConfig], nn.Module]


DEFENCES: Registry[Defence] = Registry("defence")


def register(name: str, needs_clean_data: bool):
    def decorator(fn):
        DEFENCES.register(name)(Defence(name, needs_clean_data, fn))
        return fn
    return decorator


def defend(name: str, model: nn.Module, spec: InputSpec, clean: Optional[Split],
           config: DefenceConfig = DefenceConfig()) -> nn.Module:
    defence = DEFENCES.get(name)
    require(not defence.needs_clean_data or (clean is not None and len(clean) >= 2),
            f"defence {shown(name)} needs a clean set held by the server")
    torch.manual_seed(config.seed)
    return defence.run(copy.deepcopy(model), spec, clean if defence.needs_clean_data else None, config).eval()


@register("dhbe", needs_clean_data=False)
def dhbe(model, spec, clean, config):
    return purify(model, spec, (config.dhbe or cpu_recipe()).replace(seed=config.seed))[0]


@register("adv-distill", needs_clean_data=False)
def adversarial_distillation(model, spec, clean, config):
    """DHBE without the backdoor regulariser (lambda = 0): the paper's ablation."""
    return purify(model, spec, plain_adversarial_distillation(config.dhbe or cpu_recipe()).replace(seed=config.seed))[0]


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, the batch norm that directly follows it) in module order."""
    modules = list(model.modules())
    return [(a, b) for a, b in zip(modules, modules[1:])
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and a.out_channels == b.num_features]


@register("clp", needs_clean_data=False)
@torch.no_grad()
def channel_lipschitzness_pruning(model, spec, clean, config):
    """CLP (Zheng et al., ECCV 2022): per channel, the spectral norm of its conv kernel scaled by the
    following BN; channels above mean + u * std of their layer are pruned (BN weight and bias zeroed)."""
    for conv, bn in conv_bn_pairs(model):
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs()
        kernels = conv.weight.reshape(conv.out_channels, -1) * scale[:, None]
        lipschitz = torch.stack([torch.linalg.matrix_norm(k.view(conv.in_channels // conv.groups, -1), ord=2)
                                 if k.numel() > 1 else k.abs().sum() for k in kernels])
        prune = lipschitz > lipschitz.mean() + config.clp_threshold * lipschitz.std()
        bn.weight[prune] = 0.0
        bn.bias[prune] = 0.0
    return model


@register("fine-tuning", needs_clean_data=True)
def fine_tuning(model, spec, clean, config):
    return train_classifier(model, clean, TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr,
                                                      batch_size=min(64, len(clean)), seed=config.seed))


def last_block(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    pairs = conv_bn_pairs(model)
    require(bool(pairs), "the model has no conv + batch-norm block to prune")
    return pairs[-1]


@register("fine-pruning", needs_clean_data=True)
def fine_pruning(model, spec, clean, config):
    """Fine-pruning (Liu et al. 2018): prune the last block's channels least active on clean data,
    then fine-tune."""
    conv, bn = last_block(model)
    activations = []
    handle = bn.register_forward_hook(lambda m, i, o: activations.append(F.relu(o).mean(dim=(0, 2, 3))))
    model.eval()
    with torch.no_grad():
        model(clean.images)
    handle.remove()
    order = torch.argsort(activations[0])
    pruned = order[: int(round(config.prune_ratio * len(order)))]
    mask = torch.ones(bn.num_features)
    mask[pruned] = 0.0
    keep_pruned = bn.register_forward_hook(lambda m, i, o: o * mask.to(o).view(1, -1, 1, 1))
    model = fine_tuning(model, spec, clean, config)
    keep_pruned.remove()
    with torch.no_grad():  # fold the pruning into the weights: a plain model again
        bn.weight.mul_(mask), bn.bias.mul_(mask)
    return model


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """NAD's attention: channel-wise mean of squared activations, L2-normalised per sample."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


@register("nad", needs_clean_data=True)
def neural_attention_distillation(model, spec, clean, config):
    """NAD (Li et al., ICLR 2021): fine-tune a teacher on the clean set, then train the backdoored
    model with cross-entropy plus attention distillation from that teacher at the last block."""
    teacher = fine_tuning(copy.deepcopy(model), spec, clean, config).eval()
    optimiser = torch.optim.SGD(model.parameters(), lr=config.finetune_lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.finetune_epochs):
        for index in torch.randperm(len(clean), generator=generator).split(64):
            if len(index) < 2:
                continue
            x, y = clean.images[index], clean.labels[index]
            with torch.no_grad():
                target_attention = attention_map(teacher.forward_features(x))
            loss = F.cross_entropy(model(x), y) + config.nad_beta * (
                attention_map(model.forward_features(x)) - target_attention).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model


@register("nft", needs_clean_data=True)
def neural_mask_fine_tuning(model, spec, clean, config):
    """NFT (Karim et al. 2024): the weights stay fixed; multiplicative masks on batch-norm channels
    are trained with MixUp and a regulariser keeping them near 1."""
    for p in model.parameters():
        p.requires_grad_(False)
    masks, hooks, norms = [], [], []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            mask = nn.Parameter(torch.ones(module.num_features))
            hooks.append(module.register_forward_hook(lambda m, i, o, mask=mask: o * mask.view(1, -1, 1, 1)))
            masks.append(mask)
            norms.append(module)
    optimiser = torch.optim.SGD(masks, lr=config.nft_lr, momentum=0.9)
    generator = torch.Generator().manual_seed(config.seed)
    model.eval()  # BN statistics fixed: only the masks move
    for _ in range(config.nft_iterations):
        index = torch.randint(0, len(clean), (min(128, len(clean)),), generator=generator)
        x, y = clean.images[index], clean.labels[index]
        lam = float(torch.distributions.Beta(1.0, 1.0).sample())
        perm = torch.randperm(len(index), generator=generator)
        logits = model(lam * x + (1 - lam) * x[perm])
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        loss = loss + config.nft_mask_weight * sum((m - 1).pow(2).sum() for m in masks) / sum(m.numel() for m in masks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
    with torch.no_grad():  # fold masks into BN's affine parameters: a plain model again
        for hook, norm, mask in zip(hooks, norms, masks):
            hook.remove()
            norm.weight.mul_(mask), norm.bias.mul_(mask)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def clean_subset(split: Split, per_class: int, seed: int = 0) -> Split:
    """The server's clean budget: `per_class` samples of each class."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in split.labels.unique():
        members = torch.nonzero(split.labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(chosen)
    return Split(split.images[index], split.labels[index])
