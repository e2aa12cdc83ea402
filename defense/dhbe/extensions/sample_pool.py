"""A pool of G's recent samples with T's logits on them (the memory bank of Fast-DFKD, Fang et al.,
AAAI 2022): DHBE's student steps can draw their batches from it instead of paying a fresh G and T
forward pass each. A ring buffer: the newest samples overwrite the oldest. It keeps the first
student batch and every G-step and Gp-step batch (`samples_seen`); a speed lever (docs/performance.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import DHBEConfig, ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.spec import require


class SamplePool:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pixels: Optional[torch.Tensor] = None   # allocated at the first `add`, like the samples
        self.logits: Optional[torch.Tensor] = None
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def add(self, pixels: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep a batch of samples (pixel space) and the teacher's logits on them."""
        pixels, logits = pixels.detach()[-self.capacity:], logits.detach()[-self.capacity:]
        if self.pixels is None:
            layout = (torch.channels_last if pixels.dim() == 4 and pixels.is_contiguous(memory_format=torch.channels_last)
                      and not pixels.is_contiguous() else torch.contiguous_format)
            self.pixels = pixels.new_empty(self.capacity, *pixels.shape[1:]).contiguous(memory_format=layout)
            self.logits = logits.new_empty(self.capacity, *logits.shape[1:])
        slots = (self.cursor + torch.arange(len(pixels), device=pixels.device)) % self.capacity
        self.pixels[slots] = pixels
        self.logits[slots] = logits
        self.cursor = (self.cursor + len(pixels)) % self.capacity
        self.size = min(self.size + len(pixels), self.capacity)

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` samples and their logits, uniformly from the pool (with replacement)."""
        picks = torch.randint(0, self.size, (count,), generator=generator, device=self.pixels.device)
        return self.pixels[picks], self.logits[picks]

    def state_dict(self) -> dict[str, Any]:
        return {"pixels": None if self.pixels is None else self.pixels[:self.size].clone(),
                "logits": None if self.logits is None else self.logits[:self.size].clone(),
                "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pixels = self.logits = None
        self.size = self.cursor = 0
        if state.get("pixels") is not None and len(state["pixels"]):
            self.add(state["pixels"], state["logits"])
            self.cursor = int(state["cursor"])


@extension
@dataclass(frozen=True)
class SamplePoolConfig(ExtensionConfig):
    name = "sample_pool"
    capacity: int = 2560

    def __post_init__(self) -> None:
        require(1 <= self.capacity <= 1_000_000, f"sample_pool.capacity must be in 1..1000000, got {self.capacity}")

    def validate(self, core: DHBEConfig) -> None:
        require(self.capacity >= core.batch_size,
                f"sample_pool.capacity must be at least batch_size ({core.batch_size}), got {self.capacity}")

    def build(self, trainer: Any) -> Extension:
        return SamplePoolExtension(self)


class SamplePoolExtension(Extension):
    def __init__(self, config: SamplePoolConfig) -> None:
        super().__init__(config)
        self.pool = SamplePool(config.capacity)

    def sample_batch(self, trainer) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self.pool.draw(trainer.config.batch_size, trainer.rng) if len(self.pool) else None

    @torch.no_grad()
    def samples_seen(self, trainer, pixels: torch.Tensor, teacher_logits: Optional[torch.Tensor]) -> None:
        self.pool.add(pixels, trainer.teacher(pixels) if teacher_logits is None else teacher_logits)

    def state_dict(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)
