"""Departures in how the student meets candidate triggers.

- `stamped_patches`: Gp's patch replaces the pixels under it (a BadNets-style stamp, mapped from
  [-amplitude, amplitude] to [0, 1]) at a random place per sample, 1..`copies` copies per sample
  (amplified triggers), instead of the official one additive patch per batch.
- `trigger_bank`: before the game, `warmup_steps` Gp steps against the untouched student (= T)
  search T's own backdoor; their patches fill a bank (`size`, a ring buffer) from which
  `replay_fraction` of every student step's patches are drawn.
Measurements: docs/dhbe.md (third and fourth rounds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import DHBEConfig, ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.generators import paste_patches
from defense.spec import require


@extension
@dataclass(frozen=True)
class StampedPatchesConfig(ExtensionConfig):
    name = "stamped_patches"
    copies: int = 9             # per sample: 1..copies copies
    replaces: bool = True       # the patch replaces pixels (False: added, as the official patch is)
    amplitude: float = 2.0      # bound of Gp's tanh output (official: 1)

    def __post_init__(self) -> None:
        require(self.copies >= 1, f"stamped_patches.copies must be >= 1, got {self.copies}")
        require(self.amplitude > 0, f"stamped_patches.amplitude must be > 0, got {self.amplitude}")

    def build(self, trainer: Any) -> Extension:
        return StampedPatches(self)


class StampedPatches(Extension):
    def setup(self, trainer) -> None:
        trainer.trigger_generator.amplitude = self.config.amplitude

    def paste(self, trainer, pixels: torch.Tensor, patches: torch.Tensor) -> Optional[torch.Tensor]:
        return paste_patches(pixels, patches, True, self.config.copies, trainer.rng, self.config.replaces)


@extension
@dataclass(frozen=True)
class TriggerBankConfig(ExtensionConfig):
    name = "trigger_bank"
    warmup_steps: int = 300       # Gp steps against T before the game
    size: int = 2400              # patches kept (8 per warm-up step)
    replay_fraction: float = 0.9  # share of a student step's patches drawn from the bank

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 1, f"trigger_bank.warmup_steps must be >= 1, got {self.warmup_steps}")
        require(self.size >= 1, f"trigger_bank.size must be >= 1, got {self.size}")
        require(0 <= self.replay_fraction <= 1,
                f"trigger_bank.replay_fraction must be in [0, 1], got {self.replay_fraction}")

    def build(self, trainer: Any) -> Extension:
        return TriggerBank(self, trainer.config)


class TriggerBank(Extension):
    KEPT_PER_STEP = 8

    def __init__(self, config: TriggerBankConfig, core: DHBEConfig) -> None:
        super().__init__(config)
        self.core = core   # the bank is made in setup, on the trainer's device

    def setup(self, trainer) -> None:
        self.bank = torch.zeros(0, trainer.spec.channels, self.core.patch_size, self.core.patch_size, device=trainer.device)

    def probe(self, trainer) -> None:
        """S is still T: Gp maximising S's sensitivity searches T's own backdoor."""
        if len(self.bank):
            return
        trainer.student.train()
        for _ in range(self.config.warmup_steps):
            trainer.trigger_step()
            self.remember(trainer, trainer.latent(self.core.trigger_latent_dim))

    @torch.no_grad()
    def measure(self, trainer, batches: int = 4) -> dict[str, Any]:
        """Data-free evidence of a patch backdoor: the bank's patches stamped once on fresh synthetic
        samples (models in eval mode): how often they flip T's answer, and how concentrated the
        flipped answers are on one class (a backdoor sends them to its target; an occluded clean
        digit goes anywhere). Draws from its own generator: the game's random streams are untouched."""
        generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed + 77)
        core, classes = self.core, trainer.spec.num_classes
        was_training = trainer.sample_generator.training
        trainer.sample_generator.eval()
        counts, flipped, total = torch.zeros(classes, device=trainer.device), 0, 0
        for _ in range(batches):
            z = torch.randn(core.batch_size, core.latent_dim, generator=generator, device=trainer.device)
            x = trainer.synthesise(z)
            picks = torch.randint(0, len(self.bank), (len(x),), generator=generator, device=trainer.device)
            patched = paste_patches(x, self.bank[picks].to(x), True, 1, generator, True)
            clean, answer = trainer.teacher(x).argmax(1), trainer.teacher(patched).argmax(1)
            changed = answer != clean
            counts += torch.bincount(answer[changed], minlength=classes).float()
            flipped, total = flipped + int(changed.sum()), total + len(x)
        trainer.sample_generator.train(was_training)
        top = int(counts.argmax())
        return {"teacher_flip_rate": flipped / max(total, 1), "flip_target": top,
                "flip_concentration": float(counts[top] / counts.sum()) if flipped else 0.0}

    def remember(self, trainer, z_trigger: torch.Tensor) -> None:
        with torch.no_grad():
            trainer.trigger_generator.eval()
            fresh = trainer.trigger_generator(z_trigger[:self.KEPT_PER_STEP])
            trainer.trigger_generator.train()
        self.bank = torch.cat([self.bank, fresh])[-self.config.size:]

    def student_patches(self, trainer, patches: torch.Tensor) -> torch.Tensor:
        if not len(self.bank):
            return patches
        used = int(round(self.config.replay_fraction * len(patches)))
        picks = torch.randint(0, len(self.bank), (used,), generator=trainer.rng, device=trainer.device)
        return torch.cat([self.bank[picks].to(patches), patches[used:]])

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bank" in state:
            self.bank = state["bank"]
