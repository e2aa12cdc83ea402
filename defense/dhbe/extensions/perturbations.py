"""`perturbations`: what the student meets perturbed, from one list of sources, by one mixing rule and
one refresh rule (docs/dhbe.md, "How the default works").

Officially S meets x + pad(Gp(z')): one additive patch at one place for the whole batch. Here every
batch S meets perturbed is drawn from a list of sources, each a bank of triggers with one way to stamp
them:

- `patches`: Gp's patches (the paper's trigger generator), scaled to [-`patch_amplitude`, +] and
  stamped as a BadNets trigger is (the patch replaces the pixels under it), 1..`patch_copies` copies
  per sample at random places (amplified triggers). Before the game, `warmup_steps` Gp steps against
  S = T search T's own backdoor and fill the bank (`bank_size`); a student step draws
  `replay_fraction` of its patches from it and the rest from the live Gp.
- `blend_patterns`: per suspect, a whole-image pattern inverted on T at a small ratio before the game
  (on the scan's samples) and blended into S's samples at ratios up to `blend_alpha`: the form of a
  blended trigger, which Gp's patches never find and the scan's small masks miss.
- `scan_triggers`: the scan's inverted trigger for each suspect class (mask and pattern, any size, any
  place: a patch or a whole-image blend), taken from the `ScanReport` as found, never re-derived;
  stamped 1..`trigger_copies` times, the copies after the first (and the first on a `trigger_shift`
  share of the samples) moved to a random place.

The refresh rule, one for all: before the game the sources that search T fill their banks (Gp's
warm-up, the blend patterns' first inversion); every `refresh_every` epochs each source goes on from
its latest triggers against S (`refresh_steps` steps at `refresh_lr`; Gp is trained every iteration
by the game itself) and adds what it found to its bank.

The mixing rule, one for all: of every perturbed batch, a `perturbed_share` of the rows (spread
evenly) carry a perturbation, the sources taking turns over those rows; the rest stay clean, so a
trigger's shift stays visible to batch norm against clean samples (sixteenth round). S's Eq. 8
regulariser is then taken on that one batch: no extra term, one extra forward pass per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.generators import paste_patches
from defense.scan.inversion import ScanSamples, invert_blend_patterns, invert_masks
from defense.spec import require

USES = ("student", "trigger_step", "diagnostics")   # who asks for a perturbed batch


@extension
@dataclass(frozen=True)
class PerturbationsConfig(ExtensionConfig):
    name = "perturbations"
    # source `patches`: Gp's
    patch_copies: int = 9           # per sample: 1..copies stamps
    patch_amplitude: float = 2.0    # Gp's tanh scaled by this, then mapped to pixels and clamped (replaces)
    warmup_steps: int = 300         # Gp steps against S = T before the game, whose patches fill the bank
    bank_size: int = 2400           # patches kept (8 per warm-up step)
    replay_fraction: float = 0.9    # share of a student step's patches drawn from the bank
    # source `scan_triggers`: the scan's suspects' triggers
    scan_triggers: bool = True
    trigger_copies: int = 3
    trigger_shift: float = 0.5
    # source `blend_patterns`: per suspect, a whole-image pattern blended in (the form a blended trigger has)
    blend_patterns: bool = True
    blend_ratio: float = 0.1        # the patterns are inverted at this ratio
    blend_alpha: float = 0.2        # and blended into S's samples at ratios up to this
    # the refresh rule
    refresh_every: int = 5          # > 0: every so many epochs each source goes on from its latest against S
    refresh_steps: int = 100
    refresh_lr: float = 0.1
    refresh_cost: float = 1e-3
    refresh_success: float = 0.9    # share of a batch a re-found trigger must send to its class (Neural Cleanse)
    # the mixing rule
    perturbed_share: float = 0.5    # share of a perturbed batch's rows that carry a perturbation (1: all, official)

    def __post_init__(self) -> None:
        for name, high in (("patch_copies", 64), ("warmup_steps", 100_000), ("bank_size", 1_000_000),
                           ("trigger_copies", 64), ("refresh_steps", 100_000)):
            require(0 <= getattr(self, name) <= high and (name == "warmup_steps" or getattr(self, name) >= 1),
                    f"perturbations.{name} must be in {0 if name == 'warmup_steps' else 1}..{high}, "
                    f"got {getattr(self, name)}")
        require(0 < self.patch_amplitude <= 100, f"perturbations.patch_amplitude must be in (0, 100], got {self.patch_amplitude}")
        require(0 <= self.replay_fraction <= 1, f"perturbations.replay_fraction must be in [0, 1], got {self.replay_fraction}")
        require(0 <= self.trigger_shift <= 1, f"perturbations.trigger_shift must be in [0, 1], got {self.trigger_shift}")
        require(0 <= self.refresh_every <= 100_000, f"perturbations.refresh_every must be in 0..100000, got {self.refresh_every}")
        require(0 < self.blend_ratio < 1, f"perturbations.blend_ratio must be in (0, 1), got {self.blend_ratio}")
        require(0 < self.blend_alpha < 1, f"perturbations.blend_alpha must be in (0, 1), got {self.blend_alpha}")
        require(0 < self.refresh_lr <= 10, f"perturbations.refresh_lr must be in (0, 10], got {self.refresh_lr}")
        require(0 < self.refresh_cost <= 10, f"perturbations.refresh_cost must be in (0, 10], got {self.refresh_cost}")
        require(0 < self.refresh_success <= 1, f"perturbations.refresh_success must be in (0, 1], got {self.refresh_success}")
        require(0 < self.perturbed_share <= 1,
                f"perturbations.perturbed_share is a fraction in (0, 1], got {self.perturbed_share}")

    def validate(self, core) -> None:
        rows = int(self.perturbed_share * core.batch_size)
        require(rows >= 1, f"perturbations.perturbed_share {self.perturbed_share} perturbs no row of a batch of "
                           f"{core.batch_size}")

    def build(self, trainer: Any) -> Extension:
        return Perturbations(self)


class Bank:
    """A ring buffer of triggers: rows of one or more tensors, the newest `size` kept."""

    def __init__(self, size: int, *empty: torch.Tensor) -> None:
        self.size, self.rows = size, tuple(empty)

    def __len__(self) -> int:
        return len(self.rows[0])

    def add(self, *rows: torch.Tensor) -> None:
        self.rows = tuple(torch.cat([kept, new.to(kept)])[-self.size:] for kept, new in zip(self.rows, rows))

    def draw(self, count: int, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
        picks = torch.randint(0, len(self), (count,), generator=rng, device=self.rows[0].device)
        return tuple(kept[picks] for kept in self.rows)

    def latest(self, count: int) -> tuple[torch.Tensor, ...]:
        return tuple(kept[-count:] for kept in self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [kept.clone() for kept in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state.get("rows")
        if rows:
            require(len(rows) == len(self.rows) and all(
                isinstance(r, torch.Tensor) and r.shape[1:] == kept.shape[1:] for r, kept in zip(rows, self.rows)),
                "a checkpoint's trigger bank does not fit this game")
            self.rows = tuple(r.to(kept) for r, kept in zip(rows, self.rows))


def evenly_spread(rows: int, share: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask over `rows` with floor(share * rows) True rows, spread evenly."""
    index = torch.arange(rows + 1, device=device, dtype=torch.float64)
    steps = torch.floor(index * share)
    return steps[1:] > steps[:-1]


def roll_per_sample(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each sample's image cyclically shifted by its own (dy, dx)."""
    _, channels, height, width = images.shape
    rows = (torch.arange(height, device=images.device)[None] - dy[:, None]) % height
    cols = (torch.arange(width, device=images.device)[None] - dx[:, None]) % width
    images = images.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width))
    return images.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))


class GpPatches:
    """Source `patches`: Gp's patches, from the warm-up bank and the live Gp, stamped."""

    name = "patches"

    def __init__(self, config: PerturbationsConfig, trainer) -> None:
        self.config = config
        side = trainer.config.patch_size
        self.bank = Bank(config.bank_size, torch.zeros(0, trainer.spec.channels, side, side, device=trainer.device))

    def fill(self, trainer) -> None:
        """S is still T: Gp maximising S's sensitivity searches T's own backdoor; its patches are banked."""
        trainer.student.train()
        for _ in range(self.config.warmup_steps):
            trainer.trigger_step()
            with torch.no_grad():
                trainer.trigger_generator.eval()
                self.bank.add(trainer.trigger_generator(trainer.latent(trainer.config.trigger_latent_dim)[:8]))
                trainer.trigger_generator.train()

    def stamp(self, trainer, x: torch.Tensor, patches: torch.Tensor, use: str) -> torch.Tensor:
        if use == "student" and len(self.bank):
            used = int(round(self.config.replay_fraction * len(patches)))
            patches = torch.cat([self.bank.draw(used, trainer.rng)[0].to(patches), patches[used:]])
        return paste_patches(x, self.config.patch_amplitude * patches, True, self.config.patch_copies, trainer.rng, True)

    def refresh(self, trainer) -> None:
        """Gp is trained every iteration by the game itself: nothing to re-find."""


class ScanTriggers:
    """Source `scan_triggers`: the scan's suspects' masks and patterns, re-found on S by the refresh rule."""

    name = "scan_triggers"

    def __init__(self, config: PerturbationsConfig, trainer, samples: ScanSamples) -> None:
        self.config, report = config, trainer.scan_report
        self.targets = [t.target for t in report.triggers]
        self.samples = samples
        self.bank = Bank(64 * max(len(self.targets), 1),
                         torch.stack([t.mask for t in report.triggers]).to(trainer.device),
                         torch.stack([t.pattern for t in report.triggers]).to(trainer.device))
        self.refreshes, self.success_on_student = 0, None

    def fill(self, trainer) -> None:
        """The bank starts with the scan's triggers, as found: nothing to search before the game."""

    def stamp(self, trainer, x: torch.Tensor, patches: torch.Tensor, use: str) -> torch.Tensor:
        cfg, rng, n, device = self.config, trainer.rng, len(x), x.device
        height, width = x.shape[-2:]
        mask, pattern = (t.to(x) for t in self.bank.draw(n, rng))
        stamps = torch.randint(1, cfg.trigger_copies + 1, (n,), generator=rng, device=device)
        moved = torch.rand(n, generator=rng, device=device) < cfg.trigger_shift
        stamped = x
        for stamp in range(cfg.trigger_copies):
            dy = torch.randint(0, height, (n,), generator=rng, device=device)
            dx = torch.randint(0, width, (n,), generator=rng, device=device)
            if stamp == 0:
                dy, dx = dy * moved, dx * moved
            here = (stamp < stamps).to(x).view(-1, 1, 1, 1) * roll_per_sample(mask, dy, dx)
            stamped = (1 - here) * stamped + here * roll_per_sample(pattern, dy, dx)
        return stamped

    def refresh(self, trainer) -> None:
        """Neural Cleanse on S from the latest triggers, on the scan's own samples."""
        cfg = self.config
        found = invert_masks(trainer.student, self.samples, trainer.spec.num_classes, cfg.refresh_steps,
                             cfg.refresh_lr, cfg.refresh_cost, cfg.refresh_success, classes=self.targets,
                             start=self.bank.latest(len(self.targets)))
        self.bank.add(found.masks, found.patterns)
        self.refreshes += 1
        self.success_on_student = [round(float(h), 3) for h in found.hit_rates]


class BlendPatterns:
    """Source `blend_patterns`: per suspect, a whole-image pattern inverted on T at `blend_ratio` (on the
    scan's samples, before the game), re-found on S by the refresh rule, blended in at ratios up to
    `blend_alpha` (docs/research/dhbe-log.md, sixth round: Gp's patches never find a blended trigger)."""

    name = "blend_patterns"

    def __init__(self, config: PerturbationsConfig, trainer, samples: ScanSamples) -> None:
        self.config, report = config, trainer.scan_report
        self.targets = list(report.suspects)
        self.samples = samples
        self.bank = Bank(64 * len(self.targets), torch.zeros(0, *trainer.spec.shape, device=trainer.device))
        self.refreshes, self.success_on_student = 0, None

    def fill(self, trainer) -> None:
        self.search(trainer.teacher, None)

    def search(self, model, start: Optional[torch.Tensor]) -> None:
        cfg = self.config
        found = invert_blend_patterns(model, self.samples, self.targets, cfg.blend_ratio, cfg.refresh_steps,
                                      cfg.refresh_lr, start)
        self.bank.add(found.patterns)
        self.success_on_student = [round(float(h), 3) for h in found.hit_rates]

    def refresh(self, trainer) -> None:
        self.search(trainer.student, self.bank.latest(len(self.targets))[0])
        self.refreshes += 1

    def stamp(self, trainer, x: torch.Tensor, patches: torch.Tensor, use: str) -> torch.Tensor:
        (pattern,) = self.bank.draw(len(x), trainer.rng)
        ratio = self.config.blend_alpha * torch.rand(len(x), generator=trainer.rng, device=x.device, dtype=x.dtype)
        ratio = ratio.view(-1, 1, 1, 1)
        return (1 - ratio) * x + ratio * pattern.to(x)


class Perturbations(Extension):
    def setup(self, trainer) -> None:
        self.sources: list = [GpPatches(self.config, trainer)]
        report = trainer.scan_report
        if report is None or report.samples is None:
            return
        samples = ScanSamples(report.samples.to(trainer.device))   # one copy, shared by the suspects' sources
        if self.config.scan_triggers and report.triggers:
            self.sources.append(ScanTriggers(self.config, trainer, samples))
        if self.config.blend_patterns and report.suspects:
            self.sources.append(BlendPatterns(self.config, trainer, samples))

    def probe(self, trainer) -> None:
        """Before the game: each source with an empty bank fills it (once; a resumed game has them)."""
        for source in self.sources:
            if not len(source.bank):
                source.fill(trainer)

    def epoch_start(self, trainer) -> None:
        every = self.config.refresh_every
        if every and trainer.epoch > 0 and trainer.epoch % every == 0:
            for source in self.sources:
                source.refresh(trainer)

    def perturb(self, trainer, x: torch.Tensor, patches: torch.Tensor, use: str) -> Optional[torch.Tensor]:
        """x perturbed as `use` needs: the student step meets every source, Gp's own step and the
        diagnostics Gp's patches only; the diagnostics on every row, the steps by the mixing rule."""
        sources = self.sources if use == "student" else self.sources[:1]
        versions = [source.stamp(trainer, x, patches, use) for source in sources]
        share = 1.0 if use == "diagnostics" else self.config.perturbed_share
        perturbed = evenly_spread(len(x), share, x.device)
        turn = (torch.cumsum(perturbed.long(), 0) - 1) % len(versions)   # the sources take turns
        mixed = x
        for i, version in enumerate(versions):
            rows = (perturbed & (turn == i)).view(-1, *([1] * (x.dim() - 1)))
            mixed = torch.where(rows, version, mixed)
        return mixed

    def report(self, trainer) -> Optional[dict[str, Any]]:
        found: dict[str, Any] = {"sources": [s.name for s in self.sources], "patches_banked": len(self.sources[0].bank)}
        for source in self.sources[1:]:
            found[source.name] = {"targets": source.targets, "refreshes": source.refreshes,
                                  "success_at_last_search": source.success_on_student}
        return found

    def state_dict(self) -> dict[str, Any]:
        return {source.name: {"bank": source.bank.state_dict(), "refreshes": getattr(source, "refreshes", 0),
                              "success": getattr(source, "success_on_student", None)}
                for source in self.sources}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for source in self.sources:
            if source.name in state:
                source.bank.load_state_dict(state[source.name]["bank"])
                if hasattr(source, "refreshes"):
                    source.refreshes = state[source.name]["refreshes"]
                    source.success_on_student = state[source.name].get("success")
