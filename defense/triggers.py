"""Trigger definitions and data poisoning (all in pixel space, images in [0, 1]).

`defense/` owns these because evaluation (ASR) needs them; attackers in `federated/` import them.
A trigger's `paste` puts it on images; patch triggers can also be pasted 4 or 9 times
(amplified ASR, DHBE paper Table 6).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from defense.data import Split
from defense.errors import shown
from defense.fields import MAX_SEED
from defense.registry import Registry
from defense.spec import InputSpec, require

AMPLIFICATIONS = (1, 4, 9)


class Trigger(ABC):
    @abstractmethod
    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of `images` (N, C, H, W)."""

    def paste_copies(self, images: torch.Tensor, copies: int) -> Optional[torch.Tensor]:
        """The trigger pasted `copies` times (1, 4 or 9); None where that has no meaning."""
        return self.paste(images) if copies == 1 else None


def checkerboard(size: int, channels: int) -> torch.Tensor:
    """The official DHBE/BadNets checkerboard: 1 where (row + col) is even, else 0."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((rows + cols) % 2 == 0).float()
    return board.expand(channels, size, size).clone()


PATTERNS = ("checkerboard", "tri1", "white")


def patch_pattern(name: str, size: int, channels: int) -> torch.Tensor:
    """A patch trigger's pattern: `checkerboard` (today's default; the DHBE code's `tri2` at 3x3),
    `tri1` (its inverse, the DHBE code's default `tri1_3x3`: [[0,1,0],[1,0,1],[0,1,0]]) or `white`
    (BackdoorBench's plain white square)."""
    require(name in PATTERNS, f"trigger pattern must be one of {', '.join(PATTERNS)}, got {shown(name)}")
    board = checkerboard(size, channels)
    return {"checkerboard": board, "tri1": 1.0 - board, "white": torch.ones_like(board)}[name]


def grid_positions(copies: int, height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners: 1 = bottom-right; 4 = the corners; 9 = corners, edge centres and centre."""
    require(copies in AMPLIFICATIONS, f"a trigger is pasted 1, 4 or 9 times, not {copies}")
    last_row, last_col = height - size, width - size
    if copies == 1:
        return [(last_row, last_col)]
    rows = [0, last_row] if copies == 4 else [0, last_row // 2, last_row]
    cols = [0, last_col] if copies == 4 else [0, last_col // 2, last_col]
    return [(r, c) for r in rows for c in cols]


PLACES = ("corner", "centre", "random")


@dataclass
class PatchTrigger(Trigger):
    """A k x k pattern pasted (replacing pixels where `mask` is 1) at `position` (top-left), or with
    `place` "random" at a random place per sample (drawn from `seed`, so a test set's ASR repeats)."""

    pattern: torch.Tensor  # (C, k, k)
    position: tuple[int, int]
    mask: Optional[torch.Tensor] = None  # (k, k), 1 = trigger pixel
    place: str = "corner"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mask is None:
            self.mask = torch.ones(self.pattern.shape[-2:])

    @property
    def size(self) -> int:
        return int(self.pattern.shape[-1])

    def paste_at(self, images: torch.Tensor, row: int, col: int) -> torch.Tensor:
        out = images.clone()
        k = self.size
        require(0 <= row <= images.shape[-2] - k and 0 <= col <= images.shape[-1] - k,
                f"a {k}x{k} trigger at ({row}, {col}) does not fit {images.shape[-2]}x{images.shape[-1]} images")
        mask = self.mask.to(images)
        region = out[..., row:row + k, col:col + k]
        out[..., row:row + k, col:col + k] = region * (1 - mask) + self.pattern.to(images) * mask
        return out

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        if self.place != "random":
            return self.paste_at(images, *self.position)
        k, n = self.size, len(images)
        generator = torch.Generator().manual_seed(20_000 + self.seed)
        rows = torch.randint(0, images.shape[-2] - k + 1, (n,), generator=generator)
        cols = torch.randint(0, images.shape[-1] - k + 1, (n,), generator=generator)
        out = images.clone()
        for i in range(n):
            out[i:i + 1] = self.paste_at(images[i:i + 1], int(rows[i]), int(cols[i]))
        return out

    def paste_copies(self, images: torch.Tensor, copies: int) -> Optional[torch.Tensor]:
        if copies == 1:
            return self.paste(images)
        for row, col in grid_positions(copies, images.shape[-2], images.shape[-1], self.size):
            images = self.paste_at(images, row, col)
        return images

    def part(self, index: int, parts: int) -> "PatchTrigger":
        """Part `index` of `parts` (DBA): a band of the pattern's rows, the rest masked out."""
        require(0 < parts <= self.size, f"a {self.size}x{self.size} trigger splits into 1..{self.size} parts, not {parts}")
        bands = np.array_split(np.arange(self.size), parts)
        mask = torch.zeros_like(self.mask)
        mask[torch.as_tensor(bands[index % parts])] = self.mask[torch.as_tensor(bands[index % parts])]
        return PatchTrigger(self.pattern, self.position, mask, self.place, self.seed)


@dataclass
class BlendedTrigger(Trigger):
    """x' = (1 - alpha) x + alpha * pattern (Chen et al. 2017), pattern the full image size."""

    pattern: torch.Tensor  # (C, H, W)
    alpha: float = 0.2

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * images + self.alpha * self.pattern.to(images)


@dataclass
class SignalTrigger(Trigger):
    """SIG (Barni et al. 2019): a horizontal sinusoid of amplitude `delta` added to the image."""

    delta: float = 0.1
    frequency: int = 6

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        width = images.shape[-1]
        columns = torch.arange(width, dtype=images.dtype, device=images.device)
        signal = self.delta * torch.sin(2 * torch.pi * columns * self.frequency / width)
        return (images + signal).clamp(0.0, 1.0)


# --- the attack registry: name -> trigger for an input spec ---------------------------------

@dataclass(frozen=True)
class TriggerConfig:
    trigger_size: int = 3
    blend_alpha: float = 0.2
    sig_delta: float = 0.1
    seed: int = 0
    place: str = "corner"          # patch triggers: corner (bottom-right), centre, or random per sample
    pattern: str = "checkerboard"  # patch triggers: checkerboard, tri1, white (PATTERNS)
    values: Optional[tuple[float, ...]] = None  # patch triggers: pixel values (C x k x k, row-major) in
                                                # place of the named pattern (an optimised trigger: A3FL)

    def __post_init__(self) -> None:
        require(self.pattern in PATTERNS, f"trigger pattern must be one of {', '.join(PATTERNS)}, got {shown(self.pattern)}")
        require(self.values is None or all(0.0 <= v <= 1.0 for v in self.values),
                "a patch trigger's pixel values must lie in [0, 1]")
        require(self.place in PLACES, f"trigger place must be one of {', '.join(PLACES)}, got {shown(self.place)}")
        require(1 <= self.trigger_size <= 7, f"trigger size must be in 1..7, got {self.trigger_size}")
        require(0 < self.blend_alpha < 1, f"blend alpha must be in (0, 1), got {self.blend_alpha}")
        require(0 < self.sig_delta <= 1, f"SIG delta must be in (0, 1], got {self.sig_delta}")
        require(isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
                f"trigger seed must be in 0..{MAX_SEED}, got {shown(self.seed)}")


TriggerFactory = Callable[[InputSpec, TriggerConfig], Trigger]
ATTACKS: Registry[TriggerFactory] = Registry("attack")


@ATTACKS.register("badnets")
def badnets_trigger(spec: InputSpec, config: TriggerConfig) -> Trigger:
    k = config.trigger_size
    require(k < min(spec.height, spec.width), f"a {k}x{k} trigger does not fit {spec.height}x{spec.width} images")
    position = ((spec.height - k) // 2, (spec.width - k) // 2) if config.place == "centre" else \
        (spec.height - k, spec.width - k)
    if config.values is None:
        pattern = patch_pattern(config.pattern, k, spec.channels)
    else:
        require(len(config.values) == spec.channels * k * k,
                f"a {k}x{k} trigger on {spec.channels}-channel images has {spec.channels * k * k} pixel values, "
                f"got {len(config.values)}")
        pattern = torch.tensor(config.values, dtype=torch.float32).view(spec.channels, k, k)
    return PatchTrigger(pattern, position, place=config.place, seed=config.seed)


# DBA (Xie et al. 2020) uses the same global trigger at test time; attackers paste parts of it.
ATTACKS.register("dba")(badnets_trigger)


@ATTACKS.register("blended")
def blended_trigger(spec: InputSpec, config: TriggerConfig) -> Trigger:
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    return BlendedTrigger(torch.rand(spec.shape, generator=generator), config.blend_alpha)


@ATTACKS.register("sig")
def sig_trigger(spec: InputSpec, config: TriggerConfig) -> Trigger:
    return SignalTrigger(config.sig_delta)


def make_trigger(attack: str, spec: InputSpec, config: Optional[TriggerConfig] = None) -> Trigger:
    return ATTACKS.get(attack)(spec, config or TriggerConfig())


def poison(split: Split, trigger: Trigger, rate: float, target: int, seed: int) -> tuple[Split, torch.Tensor]:
    """All-to-one poisoning: a `rate` fraction of the split (drawn among non-target images) gets the
    trigger and the label `target`. Returns the poisoned copy and the poisoned indices."""
    require(0.0 <= rate <= 1.0, f"poison rate must be in [0, 1], got {rate}")
    candidates = torch.nonzero(split.labels != target).flatten()
    count = min(int(round(rate * len(split))), len(candidates))
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    images, labels = split.images.clone(), split.labels.clone()
    if count:
        images[chosen] = trigger.paste(images[chosen])
        labels[chosen] = target
    return Split(images, labels), chosen
