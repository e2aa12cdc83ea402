"""`scan(model, spec, earlier, config) -> ScanReport`: is this model backdoored, and towards which class?

Data-free: the scanner sees the model, its input spec and, where it has them, earlier versions of the
model (a federated server's global models of earlier rounds); never data, never the attack.

1. G is fitted to the model's priors (defense/scan/inversion.py) and a pool of its samples drawn once.
2. On that pool, for the model and for every earlier version: every class's blend pattern and
   Neural Cleanse mask inverted at once. Per version and class, two anomaly indices (how far below
   the median the class's log loss, or log mask area, lies, in units of the median absolute
   deviation): `blend` (a whole-image trigger) and `mask` (a local patch); the class's score in that
   version is the larger.
3. Across versions: a class's score is the `votes`-th largest of its per-version scores (a backdoor
   shows in the versions the attack shaped; a class a federation happens to make easy flickers).
   Classes over `threshold` are the suspects, the highest first; the model is backdoored when there is one.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from defense.errors import ConfigError
from defense.fields import coerce_fields
from defense.scan.inversion import SamplePool, fit_sample_generator, invert_blends, invert_masks
from defense.scan.weights import weight_scores
from defense.spec import InputSpec, require

MIN_LOG_SPREAD = 0.25   # a factor of 1.28 between values: below it, differences are noise
KINDS = ("local patch", "whole image")


@dataclass(frozen=True)
class ScanConfig:
    """The scanner's settings (`--set scan.FIELD=VALUE` in a recipe, `--set FIELD=VALUE` for defense.scan)."""

    threshold: float = 3.0          # a class is a suspect when its score exceeds this
    votes: int = 2                  # ... in at least this many versions (all of them, if fewer)
    seed: int = 0
    generator_steps: int = 200      # G fitted to the model's priors
    generator_batch: int = 64
    latent_dim: int = 64
    generator_width: int = 16
    generator_lr: float = 1e-3
    image_prior_weight: float = 1e-4
    pool_batches: int = 8           # G's batches drawn once, shared by every inversion and version
    batch_size: int = 32            # samples per class and step (an inversion step runs K x this)
    blend_ratio: float = 0.1        # the blend patterns are found at this ratio
    blend_steps: int = 100
    blend_lr: float = 0.05
    mask_steps: int = 100
    mask_lr: float = 0.1
    mask_cost: float = 1e-3         # Neural Cleanse's initial cost on |m|_1
    mask_success: float = 0.9       # share of a batch a mask must send to its class

    FIELDS_LABEL = "scan"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            require(not isinstance(value, float) or math.isfinite(value), f"scan.{name} must be finite, got {value}")
        require(self.threshold > 0, f"scan.threshold must be > 0, got {self.threshold}")
        require(1 <= self.votes <= 1000, f"scan.votes must be in 1..1000, got {self.votes}")
        require(0 <= self.seed < 2**31, f"scan.seed must be in 0..{2**31 - 1}, got {self.seed}")
        for name, high in (("generator_steps", 100_000), ("generator_batch", 4096), ("latent_dim", 4096),
                           ("generator_width", 1024), ("pool_batches", 256), ("batch_size", 1024),
                           ("blend_steps", 100_000), ("mask_steps", 100_000)):
            require(1 <= getattr(self, name) <= high, f"scan.{name} must be in 1..{high}, got {getattr(self, name)}")
        require(self.generator_batch >= 2, "scan.generator_batch must be >= 2 (batch norm)")
        for name in ("generator_lr", "blend_lr", "mask_lr", "mask_cost"):
            require(0 < getattr(self, name) <= 10, f"scan.{name} must be in (0, 10], got {getattr(self, name)}")
        require(self.image_prior_weight >= 0, "scan.image_prior_weight must be >= 0")
        require(0 < self.blend_ratio < 1, f"scan.blend_ratio must be in (0, 1), got {self.blend_ratio}")
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

        return replace(self, generator_steps=3, pool_batches=2, batch_size=4, blend_steps=2, mask_steps=2)


@dataclass(frozen=True)
class VersionScores:
    """One version's per-class measurements and anomaly indices (large = suspiciously easy)."""

    blend_loss: tuple[float, ...]
    mask_area: tuple[float, ...]
    blend_index: tuple[float, ...]
    mask_index: tuple[float, ...]

    @property
    def score(self) -> tuple[float, ...]:
        return tuple(max(b, m) for b, m in zip(self.blend_index, self.mask_index))


@dataclass(frozen=True)
class ScanReport:
    """What the scan found: a plain, frozen record (to_dict for JSON, the manifest and the game)."""

    backdoored: bool
    suspects: tuple[int, ...]                 # the suspect classes, highest score first
    kinds: tuple[str, ...]                    # per suspect: local patch | whole image
    score: float                              # the model's score: its highest class score
    class_scores: tuple[float, ...]           # per class, over the versions (see the module's doc)
    versions: tuple[str, ...]                 # the versions' names, oldest first, the model last
    per_version: tuple[VersionScores, ...]
    weight_scores: tuple[float, ...]          # the weight-only baseline's per-class scores (not used to decide)
    threshold: float
    votes: int
    evidence: tuple[str, ...]                 # one line per decision
    seconds: float
    seconds_by_stage: Mapping[str, float] = field(default_factory=dict)

    @property
    def trigger_kind(self) -> Optional[str]:
        return self.kinds[0] if self.kinds else None

    def summary(self) -> str:
        """The human verdict, one line."""
        n = len(self.versions)
        if not self.backdoored:
            return (f"no backdoor found: highest class score {self.score:.1f} (threshold {self.threshold:g}) "
                    f"in {n} version{'s' if n > 1 else ''} of the model ({self.seconds:.1f} s)")
        first = self.suspects[0]
        above = sum(v.score[first] > self.threshold for v in self.per_version)
        others = f"; also suspected: {', '.join(map(str, self.suspects[1:]))}" if len(self.suspects) > 1 else ""
        return (f"backdoor suspected: class {first}, {self.kinds[0]}, score {self.class_scores[first]:.1f} over "
                f"threshold {self.threshold:g} in {above} of {n} version{'s' if n > 1 else ''}{others} "
                f"({self.seconds:.1f} s)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trigger_kind"] = self.trigger_kind
        data["summary"] = self.summary()
        data["per_version"] = [{**asdict(v), "score": list(v.score)} for v in self.per_version]
        return _rounded(data)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def anomaly_index(values: Sequence[float]) -> tuple[float, ...]:
    """Per class: (median - log v) / max(1.4826 MAD, MIN_LOG_SPREAD) of the log values; large = far
    below the others (Neural Cleanse's anomaly index, on logs)."""
    logs = [math.log(max(v, 1e-12)) if math.isfinite(v) else math.log(1e12) for v in values]
    median = statistics.median_low(logs)
    spread = max(1.4826 * statistics.median_low([abs(v - median) for v in logs]), MIN_LOG_SPREAD)
    return tuple((median - v) / spread for v in logs)


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
        pool = SamplePool(generator, spec, config.pool_batches, config.batch_size)
        stages["sample generator"] = time.perf_counter() - clock
        per_version = []
        for version in models:
            clock = time.perf_counter()
            blends = invert_blends(version, pool, spec.num_classes, config.blend_ratio, config.blend_steps,
                                   config.blend_lr)
            stages["blend inversions"] = stages.get("blend inversions", 0.0) + time.perf_counter() - clock
            clock = time.perf_counter()
            masks = invert_masks(version, pool, spec.num_classes, config.mask_steps, config.mask_lr,
                                 config.mask_cost, config.mask_success)
            stages["mask inversions"] = stages.get("mask inversions", 0.0) + time.perf_counter() - clock
            blend_loss, mask_area = tuple(blends.losses.tolist()), tuple(masks.areas.tolist())
            per_version.append(VersionScores(blend_loss, mask_area, anomaly_index(blend_loss),
                                             anomaly_index(mask_area)))
    return decide(per_version, names, weight_scores(model, spec.num_classes), config,
                  time.perf_counter() - started, stages)


def decide(per_version: Sequence[VersionScores], names: Sequence[str], weights: Sequence[float],
           config: ScanConfig, seconds: float = 0.0, stages: Optional[Mapping[str, float]] = None) -> ScanReport:
    """The verdict from the measurements (pure: the benchmarks re-decide cached measurements with it)."""
    num_classes = len(per_version[-1].blend_loss)
    needed = min(config.votes, len(per_version))
    class_scores = tuple(sorted((v.score[k] for v in per_version), reverse=True)[needed - 1]
                         for k in range(num_classes))
    suspects = tuple(sorted((k for k in range(num_classes) if class_scores[k] > config.threshold),
                            key=lambda k: -class_scores[k]))
    kinds, evidence = [], []
    for k in suspects:
        blend = statistics.median(v.blend_index[k] for v in per_version)
        mask = statistics.median(v.mask_index[k] for v in per_version)
        kinds.append(KINDS[0] if mask >= blend else KINDS[1])
        evidence.append(f"class {k}: score {class_scores[k]:.2f} > {config.threshold:g} in {needed} of "
                        f"{len(per_version)} versions; median blend index {blend:.2f}, mask index {mask:.2f}")
    if not suspects:
        top = max(range(num_classes), key=lambda k: class_scores[k])
        evidence.append(f"no class over {config.threshold:g} in {needed} of {len(per_version)} versions "
                        f"(highest: class {top}, {class_scores[top]:.2f})")
    return ScanReport(bool(suspects), suspects, tuple(kinds), max(class_scores), class_scores, tuple(names),
                      tuple(per_version), tuple(weights), config.threshold, config.votes, tuple(evidence),
                      seconds, dict(stages or {}))
