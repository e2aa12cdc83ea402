"""Departures about S's batch-norm statistics (docs/dhbe.md, fifteenth to eighteenth rounds).

`mixed_batches`: every batch S meets perturbed in the game carries the perturbation on a share of its
samples only; the rest stay clean (sixteenth round).

Officially S runs in train mode on a batch whose samples are all patched (the patch regulariser, Gp's
step; here also the blend and mask terms), and batch norm normalises that batch by its own statistics:
the shift a trigger adds to a channel is subtracted before S sees it, S learns to ignore only the rest,
and its running statistics, mostly of perturbed batches, damp the trigger at test time. Measured in the
fifteenth round: with the statistics re-estimated on clean images, the corner patch's backdoor came
back (ASR x1 0 -> 83%). In a mixed batch the trigger's shift stays visible against the batch's clean
samples, so S must learn to ignore it in its weights, and its running statistics are nearer to clean.
The perturbed rows are spread evenly over the batch (every data-parallel slice gets its share).

`statistics_refit` (eighteenth round): the statistics the game leaves are still those of half-perturbed
batches; re-estimated on clean synthetic samples they cost less ACC, and they are kept only where the
run's own inverted triggers say the erasure did not live in them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.generators import blend_patterns, paste_patches
from defense.mask_search import apply_mask_trigger
from defense.metrics import statistics_refitted
from defense.spec import require


@extension
@dataclass(frozen=True)
class MixedBatchesConfig(ExtensionConfig):
    name = "mixed_batches"
    perturbed_share: float = 0.5   # of each perturbed batch's samples, those that carry the perturbation

    def __post_init__(self) -> None:
        require(0 < self.perturbed_share < 1,
                f"mixed_batches.perturbed_share is a fraction in (0, 1), got {self.perturbed_share}")

    def build(self, trainer: Any) -> Extension:
        return MixedBatches(self)


def evenly_spread(rows: int, share: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask over `rows` with floor(share * rows) True rows, spread evenly."""
    index = torch.arange(rows + 1, device=device, dtype=torch.float64)
    steps = torch.floor(index * share)
    return steps[1:] > steps[:-1]


class MixedBatches(Extension):
    def perturbed_batch(self, trainer, clean: torch.Tensor, perturbed: torch.Tensor) -> Optional[torch.Tensor]:
        keep = evenly_spread(len(clean), self.config.perturbed_share, clean.device).view(-1, *([1] * (clean.dim() - 1)))
        return torch.where(keep, perturbed, clean)


@extension
@dataclass(frozen=True)
class StatisticsRefitConfig(ExtensionConfig):
    """`statistics_refit` (eighteenth round): once the game is over, the handed-back model's batch-norm
    statistics are re-estimated on `samples` clean samples of the blend search's copy of G, and that
    model is handed back only if the triggers the run inverted against T (each suspect's blend pattern at
    ratios 0.1 and 0.2, its Neural Cleanse trigger, the trigger bank's patches) do not send more than
    `max_rise` more of `check_samples` fresh samples to the suspect than they do on the model as the game
    left it: an erasure that lived in the statistics shows as a rise, and the game's statistics stay."""
    name = "statistics_refit"
    requires = ("blend_search",)     # its suspects, its copy of G and its patterns
    samples: int = 2048              # clean synthetic samples the statistics are re-estimated on
    check_samples: int = 1024        # fresh synthetic samples the triggers are measured on
    max_rise: float = 0.05           # the largest rise of any trigger's share sent to a suspect that is kept

    def __post_init__(self) -> None:
        require(self.samples >= 1, f"statistics_refit.samples must be >= 1, got {self.samples}")
        require(self.check_samples >= 1, f"statistics_refit.check_samples must be >= 1, got {self.check_samples}")
        require(0 <= self.max_rise < 1, f"statistics_refit.max_rise must be in [0, 1), got {self.max_rise}")

    def build(self, trainer: Any) -> Extension:
        return StatisticsRefit(self)


@torch.no_grad()
def share_sent_to(model: nn.Module, x: torch.Tensor, triggered: torch.Tensor, k: int) -> float:
    """Of the samples `model` does not already answer k on, the share the trigger sends to k."""
    clean, answer = model(x).argmax(1), model(triggered).argmax(1)
    keep = clean != k
    return float(((answer == k) & keep).sum() / keep.sum().clamp(min=1))


@torch.no_grad()
def trigger_shares(trainer, model: nn.Module, suspects: list[int], x: torch.Tensor,
                   generator: torch.Generator) -> dict[str, float]:
    """Per suspect k, how often each trigger the run inverted against T sends `model`'s samples `x` to k:
    k's blend pattern at ratios 0.1 and 0.2 (`blend0.1_k`, `blend0.2_k`), k's Neural Cleanse trigger
    (`mask_k`), the trigger bank's patches stamped once (`bank_k`); those the recipe has."""
    blend, mask, bank = (trainer.extension(n) for n in ("blend_search", "mask_search", "trigger_bank"))
    model.eval()
    patched = None
    if bank is not None and len(bank.bank):
        picks = torch.randint(0, len(bank.bank), (len(x),), generator=generator, device=generator.device)
        patched = paste_patches(x, bank.bank[picks].to(x), True, 1, generator, True)
    shares = {}
    for k in suspects:
        if blend is not None and blend.found is not None and k in blend.found.classes:
            pattern = blend.found.patterns[blend.found.classes.index(k)].to(x)
            for ratio in (0.1, 0.2):
                shares[f"blend{ratio}_{k}"] = share_sent_to(model, x, blend_patterns(x, pattern.expand_as(x), ratio), k)
        found = next((t for t in mask.found if t.target == k), None) if mask is not None else None
        if found is not None:
            shares[f"mask_{k}"] = share_sent_to(model, x, apply_mask_trigger(x, found.mask.to(x), found.pattern.to(x)), k)
        if patched is not None:
            shares[f"bank_{k}"] = share_sent_to(model, x, patched, k)
    return shares


class StatisticsRefit(Extension):
    def __init__(self, config: StatisticsRefitConfig) -> None:
        super().__init__(config)
        self.decision: Optional[dict[str, Any]] = None

    def finish(self, trainer, model: nn.Module) -> Optional[nn.Module]:
        suspects = list(trainer.extension("blend_search").suspects)
        if not suspects or trainer.stop_reason is not None or not trainer.history or model is trainer.teacher:
            return None   # nothing was erased, or the guard hands the input back as it came
        cfg, blend = self.config, trainer.extension("blend_search")
        generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed + 91)
        was_training = blend.search_generator.training
        blend.search_generator.eval()

        def samples(count: int) -> torch.Tensor:
            z = torch.randn(count, trainer.config.latent_dim, generator=generator, device=trainer.device)
            return torch.cat([trainer.spec.denormalise(blend.search_generator(part)) for part in z.split(256)])

        with torch.no_grad():
            refitted = statistics_refitted(model, samples(cfg.samples))
            x = samples(cfg.check_samples)
            state = generator.get_state()
            before = trigger_shares(trainer, model, suspects, x, generator)
            generator.set_state(state)   # the same bank patches at the same places on both models
            after = trigger_shares(trainer, refitted, suspects, x, generator)
            answer = trainer.teacher(x).argmax(1)
            agreement = [float((m(x).argmax(1) == answer).float().mean()) for m in (model, refitted)]
        blend.search_generator.train(was_training)
        model.eval()
        rise = max((after[key] - before[key] for key in before), default=0.0)
        kept = rise <= cfg.max_rise
        self.decision = {"refitted": kept, "largest_rise": round(rise, 4), "max_rise": cfg.max_rise,
                         "agreement_before_after": [round(a, 4) for a in agreement],
                         "shares_before": {k: round(v, 4) for k, v in before.items()},
                         "shares_after": {k: round(v, 4) for k, v in after.items()}}
        return refitted if kept else None

    def report(self, trainer) -> Optional[dict[str, Any]]:
        return self.decision

    # no state: the decision is remade, deterministically, when a resumed run finishes
