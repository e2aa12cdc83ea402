"""`mask_search`: Neural Cleanse's mask-and-pattern inversion towards each suspect class, and a
regulariser on what it finds (docs/dhbe.md, ninth round).

Gp's patches have a fixed size (`patch_size`) and are found without a target; the blend search's
patterns cover the whole image. Once the verdict names a suspect class, a trigger of any size and
place can be searched for directly: before the game, one (mask, pattern) per suspect is inverted
against T on the blend search's synthetic samples (defense/mask_search.py); every `every` epochs it
is re-found against S, from the latest, and added to a bank. Each student step stamps bank
triggers on x, 1..`copies` times, the copies after the first (and the first on a `shift` share of
the samples) moved to a random place, and pulls S's answer on them to T's answer on x, with weight
`weight`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.dhbe.losses import l1
from defense.mask_search import MaskTrigger, apply_mask_trigger, invert_mask_trigger
from defense.spec import require


@extension
@dataclass(frozen=True)
class MaskSearchConfig(ExtensionConfig):
    name = "mask_search"
    requires = ("blend_search",)      # its suspects and its synthetic samples
    weight: float = 1.0               # weight of the term in S's loss
    steps: int = 300                  # Adam steps per suspect and search
    lr: float = 0.1
    cost: float = 1e-3                # Neural Cleanse's initial cost on |m|_1
    copies: int = 3                   # per sample: 1..copies stamps of a bank trigger
    shift: float = 0.5                # share of samples whose first stamp moves to a random place
    every: int = 5                    # > 0: every so many epochs, the suspects' triggers re-found on S

    def __post_init__(self) -> None:
        require(self.weight > 0, f"mask_search.weight must be > 0, got {self.weight}")
        require(self.steps >= 1, f"mask_search.steps must be >= 1, got {self.steps}")
        require(self.lr > 0, f"mask_search.lr must be > 0, got {self.lr}")
        require(self.cost > 0, f"mask_search.cost must be > 0, got {self.cost}")
        require(self.copies >= 1, f"mask_search.copies must be >= 1, got {self.copies}")
        require(0 <= self.shift <= 1, f"mask_search.shift must be in [0, 1], got {self.shift}")
        require(self.every >= 0, f"mask_search.every must be >= 0, got {self.every}")

    def build(self, trainer: Any) -> Extension:
        return MaskSearch(self)


def roll_per_sample(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each sample's image cyclically shifted by its own (dy, dx)."""
    _, channels, height, width = images.shape
    rows = (torch.arange(height, device=images.device)[None] - dy[:, None]) % height
    cols = (torch.arange(width, device=images.device)[None] - dx[:, None]) % width
    images = images.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width))
    return images.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))


class MaskSearch(Extension):
    def setup(self, trainer) -> None:
        self.found: list[MaskTrigger] = []      # the first search's triggers (against T)
        self.bank: list[MaskTrigger] = []

    def probe(self, trainer) -> None:
        if not self.found:
            self.search(trainer)

    def epoch_start(self, trainer) -> None:
        if self.config.every and trainer.epoch > 0 and trainer.epoch % self.config.every == 0 and self.bank:
            self.search(trainer)

    def search(self, trainer) -> None:
        blend = trainer.extension("blend_search")
        suspects = list(blend.suspects)
        if not suspects:
            return
        first = not self.found
        samples = lambda: blend.search_batch(trainer)
        blend.search_generator.eval()
        latest = {t.target: t for t in self.bank}
        model = trainer.teacher if first else trainer.student
        triggers = [invert_mask_trigger(model, samples, k, self.config.steps, self.config.lr, self.config.cost,
                                        start=None if first else latest.get(k)) for k in suspects]
        if first:
            self.found = triggers
        self.bank.extend(triggers)

    def student_terms(self, trainer, x, teacher_logits, student_logits) -> Optional[torch.Tensor]:
        if not self.bank:
            return None
        cfg, rng, n, device = self.config, trainer.rng, len(x), x.device
        height, width = x.shape[-2:]
        with torch.no_grad():
            masks = torch.stack([t.mask for t in self.bank])
            patterns = torch.stack([t.pattern for t in self.bank])
            picks = torch.randint(0, len(self.bank), (n,), generator=rng, device=device)
            mask, pattern = masks[picks].to(x), patterns[picks].to(x)
            stamps = torch.randint(1, cfg.copies + 1, (n,), generator=rng, device=device)
            moved = torch.rand(n, generator=rng, device=device) < cfg.shift
            stamped = x
            for stamp in range(cfg.copies):
                dy = torch.randint(0, height, (n,), generator=rng, device=device)
                dx = torch.randint(0, width, (n,), generator=rng, device=device)
                if stamp == 0:
                    dy, dx = dy * moved, dx * moved
                here = (stamp < stamps).to(x).view(-1, 1, 1, 1)
                stamped = apply_mask_trigger(stamped, here * roll_per_sample(mask, dy, dx), roll_per_sample(pattern, dy, dx))
        own = trainer.parallel.shard   # x and T(x): the whole batch; S: this process's slice
        return cfg.weight * l1(trainer.student(own(trainer.perturbed_batch(x, stamped))), own(teacher_logits))

    def report(self, trainer) -> Optional[dict[str, Any]]:
        if not self.found:
            return None
        return {"triggers": [{"target": t.target, "success_on_teacher": round(t.success, 3),
                              "mask_mean": round(t.mask_mean, 4)} for t in self.found],
                "searches": len(self.bank) // max(len(self.found), 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"found": [asdict(t) for t in self.found], "bank": [asdict(t) for t in self.bank]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.found = [MaskTrigger(**t) for t in state.get("found", [])]
            self.bank = [MaskTrigger(**t) for t in state.get("bank", [])]
