"""The input spec: everything a defender knows about a model's input besides its weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass
import math
from typing import Any, Mapping

import torch

from defense.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds (config validation)."""
    if not condition:
        raise ConfigError(message)


MAX_CHANNELS, MAX_SIDE, MAX_CLASSES = 64, 4096, 100_000   # bounds checked before anything is allocated


@dataclass(frozen=True)
class InputSpec:
    """Shape, class count and normalisation of a classifier's input (pixel values in [0, 1])."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for name, high in (("channels", MAX_CHANNELS), ("height", MAX_SIDE), ("width", MAX_SIDE),
                           ("num_classes", MAX_CLASSES)):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool),
                    f"{name} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
            require(value <= high, f"{name} must be at most {high}, got {value}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            require(isinstance(values, (list, tuple)) and len(values) <= MAX_CHANNELS
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values),
                    f"{name} must be a list of at most {MAX_CHANNELS} finite numbers, got {str(values)[:60]!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        require(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
        require(self.height >= 1 and self.width >= 1, f"image size must be positive, got {self.height}x{self.width}")
        require(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        require(
            len(self.mean) == self.channels and len(self.std) == self.channels,
            f"mean/std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}",
        )
        require(all(s > 0 for s in self.std), "std values must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(normalised)
        return normalised * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputSpec":
        if not isinstance(data, Mapping):
            raise ConfigError(f"input spec must be an object, got {type(data).__name__}")
        try:
            return cls(**{k: data[k] for k in ("channels", "height", "width", "num_classes", "mean", "std")})
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"input spec is incomplete or malformed: {exc}") from None
