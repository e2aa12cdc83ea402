"""The scanner's data-free measurements, every class at once.

1. `fit_sample_generator`: DHBE's sample generator G fitted to the model's own priors only (the
   official total-variation image prior, DeepInversion's batch-norm statistics, DAFL's class balance):
   images the model treats like its training data, without any data.
2. `ScanSamples`: a fixed set of G's batches, drawn once and shared by every inversion and every
   version of the model (the same inputs for all, so their scores compare, and G runs once).
3. `invert_masks`: Neural Cleanse's trigger inversion (Wang et al., S&P 2019) on G's samples, batched
   over the classes: one mask and pattern per class, x' = (1 - m) x + m p, optimised together (one
   forward pass of K x B images per step, so a scan costs a fixed number of steps whatever K is), each
   class's L1 cost on its mask raised while its trigger works and lowered while it does not; the
   measure is the smallest mask area that sent `success` of a batch to the class. A backdoor is a
   shortcut: its target's trigger is found through a far smaller mask than any other class's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from defense.generators import SampleGenerator
from defense.models import frozen
from defense.priors import BatchNormStatistics, class_imbalance, total_variation_l2
from defense.spec import InputSpec


def fit_sample_generator(model: nn.Module, spec: InputSpec, steps: int, batch_size: int, latent_dim: int,
                         width: int, lr: float, image_prior_weight: float) -> SampleGenerator:
    """G fitted for `steps` Adam steps to the model's priors alone (no adversarial term)."""
    generator = SampleGenerator(spec, latent_dim, width).to(next(model.parameters()).device)
    optimiser = torch.optim.Adam(generator.parameters(), lr=lr)
    statistics = BatchNormStatistics(model)
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            for _ in range(steps):
                normalised = generator(torch.randn(batch_size, latent_dim, device=statistics.device))
                statistics.enabled = True
                logits = model(spec.denormalise(normalised))
                statistics.enabled = False
                loss = (image_prior_weight * total_variation_l2(normalised) + statistics.collect()
                        + class_imbalance(logits))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        statistics.remove()
        model.train(was_training)
    return generator.eval()


class ScanSamples:
    """Batches of images in pixels (batches, B, C, H, W), drawn once and shared by every inversion."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    @classmethod
    def draw(cls, generator: SampleGenerator, spec: InputSpec, batches: int, batch_size: int) -> "ScanSamples":
        """`batches` batches of `batch_size` images of G (memory: that many images)."""
        with torch.no_grad():
            device = next(generator.parameters()).device
            return cls(torch.stack([spec.denormalise(generator(torch.randn(batch_size, generator.latent_dim,
                                                                          device=device)))
                                    for _ in range(batches)]).clamp(0.0, 1.0))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, step: int) -> torch.Tensor:
        return self.images[step % len(self.images)]


def _per_class_cross_entropy(model: nn.Module, inputs: torch.Tensor,
                             classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (K, B, C, H, W), row i perturbed towards class classes[i]: CE towards it per row (K,),
    and the share of each row sent to it (K,)."""
    rows, batch = inputs.shape[:2]
    logits = model(inputs.reshape(rows * batch, *inputs.shape[2:])).float()
    labels = classes.repeat_interleave(batch)
    cross_entropy = F.cross_entropy(logits, labels, reduction="none").view(rows, batch).mean(1)
    hits = (logits.argmax(1) == labels).float().view(rows, batch).mean(1)
    return cross_entropy, hits


@dataclass
class MaskInversion:
    areas: torch.Tensor           # (K,) smallest mask mean that sent `success` of a batch to k (1.0: never)
    concentrations: torch.Tensor  # (K,) share of that mask's mass inside its densest window (a local patch: near 1)
    hit_rates: torch.Tensor       # (K,) share of the last batch each class's trigger sent to it
    masks: torch.Tensor           # (K, 1, H, W) in [0, 1]: the smallest working mask (the last one if none worked)
    patterns: torch.Tensor        # (K, C, H, W) in [0, 1]: its pattern


def concentration(mask: torch.Tensor) -> torch.Tensor:
    """(K,) share of each mask's (K, 1, H, W) mass in its densest square window of a quarter of the
    image's shorter side (at least 3 pixels)."""
    side = max(3, min(mask.shape[-2:]) // 4)
    windows = F.avg_pool2d(mask, side, stride=1) * side * side
    return windows.flatten(1).amax(1) / mask.flatten(1).sum(1).clamp_min(1e-12)


def invert_masks(model: nn.Module, pool: ScanSamples, num_classes: int, steps: int, lr: float, cost: float,
                 success: float, max_images: int = 1024, classes: Optional[Sequence[int]] = None,
                 start: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> MaskInversion:
    """Neural Cleanse's mask-and-pattern inversion towards every class at once (or towards `classes`),
    each class with its own cost schedule (x1.5 after 5 steps at `success`, / 1.5^1.5 after 5 below, in
    [1e-6, 1]). `start`: (masks, patterns) to go on from, one per class inverted (the game re-finds the
    scan's triggers on its student from the latest). Memory is bounded by `max_images` images per
    forward pass: with more classes than fit, they are inverted in groups (the same maths: every
    class's trigger has its own parameters and loss)."""
    class_ids = list(range(num_classes)) if classes is None else list(classes)
    return _in_groups(pool, class_ids, max_images, lambda ids, part: _invert_mask_group(
        model, pool, ids, steps, lr, cost, success, None if start is None else (start[0][part], start[1][part])))


def invert_blend_patterns(model: nn.Module, pool: ScanSamples, classes: Sequence[int], ratio: float, steps: int,
                          lr: float, start: Optional[torch.Tensor] = None, max_images: int = 1024) -> MaskInversion:
    """Per class k in `classes`, all at once: the pattern p_k in [0, 1] that, blended in at `ratio`,
    (1 - ratio) x + ratio p_k, sends the samples to k (Adam on its cross-entropy; a blended trigger is
    the whole image at a small ratio, a form the mask inversion's small masks miss). `start`: patterns
    to go on from (default flat grey). The mask of every class is the constant `ratio`. Memory: at most
    `max_images` images per forward pass (more classes are inverted in groups)."""
    return _in_groups(pool, list(classes), max_images, lambda ids, part: _invert_blend_group(
        model, pool, ids, ratio, steps, lr, None if start is None else start[part]))


def _in_groups(pool: ScanSamples, class_ids: list[int], max_images: int, invert_group) -> MaskInversion:
    """`invert_group(ids, part)` over groups of classes small enough that a forward pass holds at most
    `max_images` images (`part`: the group's slice of the classes, for their starts), joined in order."""
    size = max(1, max_images // len(pool.batch(0)))
    parts = [invert_group(class_ids[first:first + size], slice(first, first + size))
             for first in range(0, len(class_ids), size)]
    return MaskInversion(*(torch.cat(values) for values in zip(
        *((p.areas, p.concentrations, p.hit_rates, p.masks, p.patterns) for p in parts))))


def _invert_blend_group(model: nn.Module, pool: ScanSamples, class_ids: list[int], ratio: float, steps: int,
                        lr: float, start: Optional[torch.Tensor]) -> MaskInversion:
    like = pool.batch(0)
    device = like.device
    targets = torch.tensor(class_ids, device=device)
    raw = (torch.zeros(len(targets), *like.shape[1:], device=device) if start is None
           else _logit(start.to(device))).requires_grad_(True)
    optimiser = torch.optim.Adam([raw], lr=lr)
    hits = torch.zeros(len(targets), device=device)
    with _frozen_eval(model):
        for step in range(steps):
            pattern = torch.sigmoid(raw)
            cross_entropy, hits = _per_class_cross_entropy(
                model, (1 - ratio) * pool.batch(step).unsqueeze(0) + ratio * pattern.unsqueeze(1), targets)
            optimiser.zero_grad(set_to_none=True)
            cross_entropy.sum().backward()
            optimiser.step()
    masks = torch.full((len(targets), 1, *like.shape[2:]), ratio, device=device)
    return MaskInversion(torch.full((len(targets),), ratio, device=device), torch.zeros(len(targets), device=device),
                         hits.detach(), masks, torch.sigmoid(raw.detach()))


def _logit(values: torch.Tensor) -> torch.Tensor:
    return torch.logit(values.clamp(1e-4, 1 - 1e-4))


def _invert_mask_group(model: nn.Module, pool: ScanSamples, class_ids: list[int], steps: int, lr: float, cost: float,
                       success: float, start: Optional[tuple[torch.Tensor, torch.Tensor]]) -> MaskInversion:
    like = pool.batch(0)
    channels, height, width = like.shape[1:]
    device = like.device
    num_classes = len(class_ids)
    classes = torch.tensor(class_ids, device=device)
    if start is None:
        mask_raw = torch.full((num_classes, 1, height, width), -3.0, device=device)  # 5% each
        pattern_raw = torch.zeros(num_classes, channels, height, width, device=device)
    else:
        mask_raw, pattern_raw = _logit(start[0].to(device)), _logit(start[1].to(device))
    mask_raw, pattern_raw = mask_raw.requires_grad_(True), pattern_raw.requires_grad_(True)
    optimiser = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    costs = torch.full((num_classes,), cost, device=device)
    above = torch.zeros(num_classes, device=device)
    below = torch.zeros(num_classes, device=device)
    best = torch.ones(num_classes, device=device)
    best_concentration = torch.zeros(num_classes, device=device)
    best_mask = torch.zeros(num_classes, 1, height, width, device=device)
    best_pattern = torch.zeros(num_classes, channels, height, width, device=device)
    found = torch.zeros(num_classes, dtype=torch.bool, device=device)
    hits = torch.zeros(num_classes, device=device)
    with _frozen_eval(model):
        for step in range(steps):
            mask, pattern = torch.sigmoid(mask_raw), torch.sigmoid(pattern_raw)
            x = pool.batch(step).unsqueeze(0)
            cross_entropy, hits = _per_class_cross_entropy(model, (1 - mask.unsqueeze(1)) * x
                                                           + (mask * pattern).unsqueeze(1), classes)
            sizes = mask.flatten(1).sum(1)
            optimiser.zero_grad(set_to_none=True)
            (cross_entropy + costs * sizes).sum().backward()
            optimiser.step()
            with torch.no_grad():   # on the device: no host synchronisation inside the loop
                works = hits >= success
                area = sizes / (height * width)
                better = works & (area < best)
                best = torch.where(better, area, best)
                best_concentration = torch.where(better, concentration(mask), best_concentration)
                chosen = better.view(-1, 1, 1, 1)
                best_mask = torch.where(chosen, mask.detach(), best_mask)
                best_pattern = torch.where(chosen, pattern.detach(), best_pattern)
                found = found | better
                above, below = torch.where(works, above + 1, 0.0), torch.where(works, 0.0, below + 1)
                costs = torch.where(above >= 5, costs * 1.5, torch.where(below >= 5, costs / 1.5 ** 1.5, costs))
                above, below = torch.where(above >= 5, 0.0, above), torch.where(below >= 5, 0.0, below)
                costs = costs.clamp(1e-6, 1.0)
        with torch.no_grad():   # a class whose trigger never worked keeps its last one
            never = (~found).view(-1, 1, 1, 1)
            best_mask = torch.where(never, torch.sigmoid(mask_raw), best_mask)
            best_pattern = torch.where(never, torch.sigmoid(pattern_raw), best_pattern)
    return MaskInversion(best.nan_to_num(nan=1.0), best_concentration.nan_to_num(nan=0.0), hits.detach(),
                         best_mask, best_pattern)


class _frozen_eval:
    """The model in eval mode with no parameter gradients, restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.frozen = frozen(model)

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.frozen.__enter__()

    def __exit__(self, *exc) -> None:
        self.frozen.__exit__(*exc)
        self.model.train(self.was_training)
