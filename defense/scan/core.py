"""`scan(model, spec, earlier, config) -> ScanReport`: is this model backdoored, and towards which class?

Data-free: the scanner sees the model, its input spec and, where it has them, earlier versions of the
model (a federated server's global models of earlier rounds); never data, never the attack.

1. G is fitted to the model's priors (defense/scan/inversion.py) and a pool of its samples drawn once.
2. On that pool, for the model and for every earlier version: every class's Neural Cleanse trigger
   (mask and pattern) inverted at once; per class, the smallest mask that sends `mask_success` of a
   batch to the class.
3. A class's score in a version is its mask's depth: how many e-folds smaller than the median
   class's mask it is (median over classes of log area, minus the class's log area). A backdoor is a
   shortcut: its target is reached through a far smaller mask than any class the data made easy.
4. The verdict is the model's own: the classes whose score exceeds `threshold` are the suspects, the
   highest first. The earlier versions' scores are evidence beside it (in how many versions a suspect
   stands out); on the calibration models weighing them in did not separate better (docs/scan.md).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from defense.errors import ConfigError
from defense.fields import coerce_fields
from defense.scan.inversion import ScanSamples, fit_sample_generator, invert_masks
from defense.scan.weights import weight_scores
from defense.spec import InputSpec, require



@dataclass(frozen=True)
class ScanConfig:
    """The scanner's settings (`--set scan.FIELD=VALUE` in a recipe, `--set FIELD=VALUE` for defense.scan)."""

    threshold: float = 0.85         # a class is a suspect when its score (mask depth, e-folds) exceeds this
    seed: int = 0
    generator_steps: int = 200      # G fitted to the model's priors
    generator_batch: int = 64
    latent_dim: int = 64
    generator_width: int = 16
    generator_lr: float = 1e-3
    image_prior_weight: float = 1e-4
    pool_batches: int = 8           # G's batches drawn once, shared by every inversion and version
    batch_size: int = 32            # samples per class and step (an inversion step runs K x this)
    mask_steps: int = 100
    mask_lr: float = 0.1
    mask_cost: float = 1e-3         # Neural Cleanse's initial cost on |m|_1
    mask_success: float = 0.9       # share of a batch a mask must send to its class
    max_images: int = 1024          # images per forward pass (memory): more classes are inverted in groups

    FIELDS_LABEL = "scan"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            require(not isinstance(value, float) or math.isfinite(value), f"scan.{name} must be finite, got {value}")
        require(self.threshold > 0, f"scan.threshold must be > 0, got {self.threshold}")
        require(0 <= self.seed < 2**31, f"scan.seed must be in 0..{2**31 - 1}, got {self.seed}")
        for name, high in (("generator_steps", 100_000), ("generator_batch", 4096), ("latent_dim", 4096),
                           ("generator_width", 1024), ("pool_batches", 256), ("batch_size", 1024),
                           ("mask_steps", 100_000), ("max_images", 1 << 20)):
            require(1 <= getattr(self, name) <= high, f"scan.{name} must be in 1..{high}, got {getattr(self, name)}")
        require(self.generator_batch >= 2, "scan.generator_batch must be >= 2 (batch norm)")
        for name in ("generator_lr", "mask_lr", "mask_cost"):
            require(0 < getattr(self, name) <= 10, f"scan.{name} must be in (0, 10], got {getattr(self, name)}")
        require(self.image_prior_weight >= 0, "scan.image_prior_weight must be >= 0")
        require(0 < self.mask_success <= 1, f"scan.mask_success must be in (0, 1], got {self.mask_success}")

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "ScanConfig":
        """The one constructor from strings / JSON values: every name and value checked."""
        return cls(**coerce_fields(cls, values, "scan"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def smoke_sized(self) -> "ScanConfig":
        """Seconds-long (CI's smoke runs): every step count cut to a few."""
        from dataclasses import replace

        return replace(self, generator_steps=3, pool_batches=2, batch_size=4, mask_steps=2)


@dataclass(frozen=True)
class VersionScores:
    """One version's per-class measurements and scores (large = suspiciously easy to reach)."""

    mask_area: tuple[float, ...]             # the smallest mask's mean that sent `mask_success` of a batch there
    mask_concentration: tuple[float, ...]    # that mask's share in its densest window (a local patch: near 1)
    score: tuple[float, ...]                 # the mask's depth below the median class's, in e-folds


@dataclass(frozen=True, eq=False)
class SuspectTrigger:
    """A suspect class's inverted trigger, x' = (1 - mask) x + mask * pattern (the smallest that worked
    in the model itself): what the erasing game starts from, so it never re-inverts what the scan found."""

    target: int
    mask: torch.Tensor       # (1, H, W) in [0, 1]
    pattern: torch.Tensor    # (C, H, W) in [0, 1]


@dataclass(frozen=True)
class ScanReport:
    """What the scan found: a plain, frozen record (to_dict for JSON, the manifest and the game)."""

    backdoored: bool
    suspects: tuple[int, ...]                 # the suspect classes, highest score first
    score: float                              # the model's score: its highest class score
    class_scores: tuple[float, ...]           # per class, the model's own (the last version's)
    versions: tuple[str, ...]                 # the versions' names, oldest first, the model last
    per_version: tuple[VersionScores, ...]
    weight_scores: tuple[float, ...]          # the weight-only baseline's per-class scores (not used to decide)
    threshold: float
    evidence: tuple[str, ...]                 # one line per decision
    seconds: float
    seconds_by_stage: Mapping[str, float] = field(default_factory=dict)
    # what the game is handed (tensors on the CPU; not in to_dict): the suspects' triggers, in the
    # suspects' order, and the pool of G's samples they were inverted on
    triggers: tuple[SuspectTrigger, ...] = field(default=(), compare=False, repr=False)
    samples: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def summary(self) -> str:
        """The human verdict, one line."""
        n = len(self.versions)
        if not self.backdoored:
            return (f"no backdoor found: highest class score {self.score:.2f} (threshold {self.threshold:g}) "
                    f"in {n} version{'s' if n > 1 else ''} of the model ({self.seconds:.1f} s)")
        first = self.suspects[0]
        above = sum(v.score[first] > self.threshold for v in self.per_version)
        others = f"; also suspected: {', '.join(map(str, self.suspects[1:]))}" if len(self.suspects) > 1 else ""
        return (f"backdoor suspected: class {first}, score {self.class_scores[first]:.2f} over "
                f"threshold {self.threshold:g} (over it in {above} of {n} version{'s' if n > 1 else ''}){others} "
                f"({self.seconds:.1f} s)")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("triggers", "samples")}
        data["per_version"] = [asdict(v) for v in self.per_version]
        data["seconds_by_stage"] = dict(self.seconds_by_stage)
        data["summary"] = self.summary()
        data["how_to_read"] = READING
        return _rounded(data)


READING = ("score: how much smaller the smallest trigger mask that sends a class's inputs to it is than the "
           "median class's, in e-folds (log of the ratio), per class and per version; a class whose score is over "
           "`threshold` is a suspect; `backdoored` when any is")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def depth(values: Sequence[float]) -> tuple[float, ...]:
    """Per class: median over the classes of log v, minus log v (e-folds below the median class)."""
    logs = [math.log(max(v, 1e-12)) if math.isfinite(v) else 0.0 for v in values]
    median = statistics.median(logs)
    return tuple(median - v for v in logs)


def check_versions(model: nn.Module, earlier: Sequence[nn.Module]) -> None:
    """Every earlier version must be the same network: the same parameter names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for i, version in enumerate(earlier, 1):
        theirs = {k: tuple(v.shape) for k, v in version.state_dict().items()}
        if theirs != shapes:
            differing = sorted(set(shapes) ^ set(theirs)) or sorted(k for k in shapes if shapes[k] != theirs[k])
            raise ConfigError(f"earlier version {i} is another network than the model (first difference: "
                              f"{differing[0][:80]})")


def scan(model: nn.Module, spec: InputSpec, earlier: Sequence[nn.Module] = (),
         config: ScanConfig = ScanConfig(), device: torch.device | str = "cpu",
         version_names: Optional[Sequence[str]] = None) -> ScanReport:
    """Scan `model` (and its `earlier` versions, oldest first) for a backdoor; see the module's doc."""
    started = time.perf_counter()
    check_versions(model, earlier)
    device = torch.device(device)
    models = [m.to(device) for m in (*earlier, model)]
    names = tuple(version_names) if version_names else tuple(
        [f"earlier {i}" for i in range(1, len(earlier) + 1)] + ["model"])
    require(len(names) == len(models), "one name per version")
    stages: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        clock = time.perf_counter()
        generator = fit_sample_generator(model, spec, config.generator_steps, config.generator_batch,
                                         config.latent_dim, config.generator_width, config.generator_lr,
                                         config.image_prior_weight)
        pool = ScanSamples.draw(generator, spec, config.pool_batches, config.batch_size)
        stages["sample generator"] = time.perf_counter() - clock
        per_version, inversion = [], None
        for version in models:
            clock = time.perf_counter()
            inversion = invert_masks(version, pool, spec.num_classes, config.mask_steps, config.mask_lr,
                                     config.mask_cost, config.mask_success, config.max_images)
            stages["mask inversions"] = stages.get("mask inversions", 0.0) + time.perf_counter() - clock
            areas = tuple(inversion.areas.tolist())
            per_version.append(VersionScores(areas, tuple(inversion.concentrations.tolist()), depth(areas)))
    report = decide(per_version, names, weight_scores(model, spec.num_classes), config,
                    time.perf_counter() - started, stages)
    triggers = tuple(SuspectTrigger(k, inversion.masks[k].cpu(), inversion.patterns[k].cpu()) for k in report.suspects)
    return replace(report, triggers=triggers, samples=pool.images.cpu())


def decide(per_version: Sequence[VersionScores], names: Sequence[str], weights: Sequence[float],
           config: ScanConfig, seconds: float = 0.0, stages: Optional[Mapping[str, float]] = None) -> ScanReport:
    """The verdict from the measurements (pure: the benchmarks re-decide cached measurements with it)."""
    model = per_version[-1]
    class_scores = tuple(model.score)
    suspects = tuple(sorted((k for k in range(len(class_scores)) if class_scores[k] > config.threshold),
                            key=lambda k: -class_scores[k]))
    evidence = []
    for k in suspects:
        above = [name for name, v in zip(names, per_version) if v.score[k] > config.threshold]
        evidence.append(f"class {k}: its smallest mask ({100 * model.mask_area[k]:.2f}% of the image, "
                        f"{100 * model.mask_concentration[k]:.0f}% of it in one window) is {class_scores[k]:.2f} "
                        f"e-folds below the median class's (threshold {config.threshold:g}); over the threshold in "
                        f"{len(above)} of {len(per_version)} versions ({', '.join(above)})")
    if not suspects:
        top = max(range(len(class_scores)), key=lambda k: class_scores[k])
        evidence.append(f"no class's smallest mask is more than {config.threshold:g} e-folds below the median "
                        f"class's (highest: class {top}, {class_scores[top]:.2f})")
    return ScanReport(bool(suspects), suspects, max(class_scores), class_scores, tuple(names),
                      tuple(per_version), tuple(weights), config.threshold, tuple(evidence), seconds,
                      dict(stages or {}))
