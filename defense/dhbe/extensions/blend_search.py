"""`blend_search`: a data-free search for blended backdoors and a second regulariser against them
(docs/dhbe.md, sixth round). Gp models small patches; a blended trigger x' = (1 - a) x + a p is a
full-image perturbation it never finds.

Before the game, a copy of G fitted to T's priors alone (`warmup_steps` G steps) supplies samples on
which one blend pattern per class is inverted against T (defense/blend_search.py). With a scan stage
in the recipe, the scan's suspects (every class when it found none and the game runs anyway) put
their patterns in a bank; without one, the classes whose anomaly index exceeds `suspect_threshold`
(all classes with 0). Every
`every` epochs the kept classes' patterns are re-found against S, from their latest, and added.
Each student step blends bank patterns into x at ratios up to `alpha` and pulls S's answer on them
to T's (`anchor` teacher) or S's (`anchor` student) answer on x, with weight `weight`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from defense.blend_search import ClassPatterns, invert_class_patterns
from defense.dhbe.config import ExtensionConfig, extension
from defense.dhbe.extensions.base import Extension
from defense.dhbe.losses import l1
from defense.generators import blend_patterns
from defense.spec import require

ANCHORS = ("teacher", "student")


@extension
@dataclass(frozen=True)
class BlendSearchConfig(ExtensionConfig):
    name = "blend_search"
    weight: float = 1.0               # weight of the blend term in S's loss
    alpha: float = 0.2                # largest blend ratio of that term (perceptibility bound)
    ratio: float = 0.1                # per-class patterns are found on T at this blend ratio
    steps: int = 100                  # Adam steps per class
    lr: float = 0.05
    suspect_threshold: float = 2.0    # no scan stage: only classes whose anomaly index exceeds it (0: every class)
    every: int = 5                    # > 0: every so many epochs, the kept classes re-found on S
    warmup_steps: int = 300           # prior-only steps of the G copy whose samples the search uses
    anchor: str = "teacher"

    def __post_init__(self) -> None:
        require(self.weight > 0, f"blend_search.weight must be > 0, got {self.weight}")
        require(0 < self.alpha < 1, f"blend_search.alpha must be in (0, 1), got {self.alpha}")
        require(0 < self.ratio < 1, f"blend_search.ratio must be in (0, 1), got {self.ratio}")
        require(self.steps >= 1, f"blend_search.steps must be >= 1, got {self.steps}")
        require(self.lr > 0, f"blend_search.lr must be > 0, got {self.lr}")
        require(self.suspect_threshold >= 0, "blend_search.suspect_threshold must be >= 0")
        require(self.every >= 0, f"blend_search.every must be >= 0, got {self.every}")
        require(self.warmup_steps >= 0, "blend_search.warmup_steps must be >= 0")
        require(self.anchor in ANCHORS, f"blend_search.anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")

    def build(self, trainer: Any) -> Extension:
        return BlendSearch(self)


class BlendSearch(Extension):
    def setup(self, trainer) -> None:
        self.search_generator = copy.deepcopy(trainer.sample_generator)  # G itself stays as the recipe has it
        self.bank = torch.zeros(0, *trainer.spec.shape, device=trainer.device)
        self.found: Optional[ClassPatterns] = None   # the first search's evidence (every class, against T)
        self.suspects: list[int] = []                # the classes whose anomaly index exceeds the threshold
        self.classes: list[int] = []                 # the classes kept in the bank

    def search_batch(self, trainer) -> torch.Tensor:
        """A fresh batch of the search's copy of G, in pixels: what every search (and the mask search) runs on."""
        return trainer.spec.denormalise(self.search_generator(trainer.latent(trainer.config.latent_dim)))

    def probe(self, trainer) -> None:
        if self.found is None:
            self.search(trainer)

    def epoch_start(self, trainer) -> None:
        if self.config.every and trainer.epoch > 0 and trainer.epoch % self.config.every == 0:
            self.search(trainer)

    def search(self, trainer) -> None:
        cfg, core = self.config, trainer.config
        first = self.found is None
        report = trainer.scan_report
        every_class = list(range(trainer.spec.num_classes))
        if first and report is not None:   # the scan named the suspects: invert only theirs
            classes = list(report.suspects) or every_class
        else:
            classes = every_class if first else self.classes
        if not classes:
            return
        if first:  # G's copy, fitted to T's priors alone
            self.search_generator.load_state_dict(trainer.sample_generator.state_dict())
            optimiser = torch.optim.Adam(self.search_generator.parameters(), lr=core.generator_lr)
            for _ in range(cfg.warmup_steps):
                trainer.generator_step(self.search_generator, optimiser)
        self.search_generator.eval()
        found = invert_class_patterns(
            trainer.teacher if first else trainer.student,
            lambda: self.search_batch(trainer),
            classes, cfg.ratio, cfg.steps, cfg.lr, start=None if first else self.bank[-len(classes):])
        if first:
            self.found = found
            if report is not None:   # the scan's suspects; a blind game (none) banks every class
                self.suspects, self.classes = list(report.suspects), list(classes)
            else:
                self.suspects = found.suspects(cfg.suspect_threshold) if cfg.suspect_threshold > 0 else classes
                self.classes = list(self.suspects)
        kept = found.patterns[[found.classes.index(k) for k in self.classes]] if first else found.patterns
        self.bank = torch.cat([self.bank, kept.to(self.bank)])

    def student_terms(self, trainer, x, teacher_logits, student_logits) -> Optional[torch.Tensor]:
        if not len(self.bank):
            return None
        with torch.no_grad():
            picks = torch.randint(0, len(self.bank), (len(x),), generator=trainer.rng, device=trainer.device)
            patterns = self.bank[picks]
            ratios = self.config.alpha * torch.rand(len(x), generator=trainer.rng, device=trainer.device, dtype=x.dtype)
            x_blended = blend_patterns(x, patterns, ratios)
        own = trainer.parallel.shard   # x and T(x): the whole batch; S(x): this process's slice
        anchor = own(teacher_logits) if self.config.anchor == "teacher" else student_logits.detach()
        return self.config.weight * l1(trainer.student(own(trainer.perturbed_batch(x, x_blended))), anchor)

    def evidence(self) -> Optional[dict[str, Any]]:
        """The data-free evidence of the first search, for a defender's report."""
        if self.found is None:
            return None
        return {"classes": self.found.classes, "losses": self.found.losses,
                "anomaly_index": self.found.anomaly_index(), "suspects": self.suspects, "kept": self.classes}

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.clone(), "search_generator": copy.deepcopy(self.search_generator.state_dict()),
                "found": asdict(self.found) if self.found is not None else None, "classes": list(self.classes),
                "suspects": list(self.suspects)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.bank = state["bank"]
        self.search_generator.load_state_dict(state["search_generator"])
        self.found = ClassPatterns(**state["found"]) if state.get("found") else None
        self.classes = list(state.get("classes", []))
        self.suspects = list(state.get("suspects", self.classes))
