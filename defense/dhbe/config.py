"""DHBE's configuration: the official hyper-parameters (`DHBEConfig`), the departures as named
extension configs, and a `Recipe` = the official fields plus a list of extensions.

There is one way in from outside: `Recipe.from_dict` (a JSON file, a Ray job's payload) and
`Recipe.with_overrides` (FIELD=VALUE strings from `--set`, `--purify-set` or the `flwr run` config).
Both check every name against the dataclasses and the extension registry and validate every value
before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Mapping, Optional

from defense.errors import shown
from defense.fields import coerce_fields as _coerce_fields
from defense.registry import Registry
from defense.scan.core import ScanConfig
from defense.spec import InputSpec, require


# Upper bounds far above any sensible run: a typo (batch_size=1000000000) is an error, not an allocation.
INTEGER_BOUNDS = {"epochs": 100_000, "iters_per_epoch": 1_000_000, "student_steps": 1_000, "batch_size": 65_536,
                  "latent_dim": 65_536, "trigger_latent_dim": 65_536, "generator_width": 4_096,
                  "trigger_width": 4_096, "patch_size": 1_024}


PRECISIONS = ("fp32", "bf16")   # fp16 needs loss scaling for S, G, Gp and the searches: not built


@dataclass(frozen=True)
class DHBEConfig:
    """The official code's hyper-parameters and defaults (paper scale: 300 x 50 iterations)."""

    lam: float = 0.1                      # lambda of Eq. 8: weight of the backdoor regulariser
    epochs: int = 300
    iters_per_epoch: int = 50
    student_steps: int = 5                # student updates per iteration (paper text: 3)
    batch_size: int = 256
    student_lr: float = 0.1               # SGD, momentum 0.9
    student_momentum: float = 0.9
    student_weight_decay: float = 5e-4
    generator_lr: float = 1e-3            # Adam, for G
    trigger_lr: float = 1e-3              # Adam, for Gp
    lr_milestones: tuple[float, ...] = (0.6, 0.8)   # fractions of training where all lrs x lr_decay
    lr_decay: float = 0.1
    latent_dim: int = 256                 # z
    trigger_latent_dim: int = 256         # z'
    generator_width: int = 64             # ngf of G
    trigger_width: int = 64               # channels inside Gp
    patch_size: int = 5                   # Gp's output side
    image_prior_weight: float = 1e-4      # total-variation (L2) prior on G's samples
    seed: int = 0
    # --- speed and safety only, the maths is unchanged ---
    channels_last: bool = True            # NHWC convolutions (1.28x on CPU for the small CNN)
    max_recoveries: int = 3               # non-finite loss: roll back the epoch and halve all lrs
    # --- speed, with the maths in lower precision (opt-in, measured in docs/performance.md) ---
    precision: str = "fp32"               # fp32, or bf16: autocast for the networks, logits and Eq. 8 in fp32
    compile: bool = False                 # torch.compile T and S (in place: state_dict keys unchanged)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        for name, value in asdict(self).items():
            values = value if isinstance(value, tuple) else (value,)
            require(all(not isinstance(v, float) or math.isfinite(v) for v in values),
                    f"{name} must be finite, got {value}")
        for name, high in INTEGER_BOUNDS.items():
            require(1 <= getattr(self, name) <= high, f"{name} must be in 1..{high}, got {getattr(self, name)}")
        require(self.lam >= 0, f"lambda must be >= 0, got {self.lam}")
        require(self.batch_size >= 2, f"batch_size must be >= 2 (batch norm), got {self.batch_size}")
        require(0 <= self.seed < 2**31, f"seed must be in 0..{2**31 - 1}, got {self.seed}")
        for name in ("student_lr", "generator_lr", "trigger_lr"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        require(0 <= self.student_momentum < 1, f"student_momentum must be in [0, 1), got {self.student_momentum}")
        require(0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        require(all(0 < m < 1 for m in self.lr_milestones),
                f"lr_milestones are fractions in (0, 1), got {self.lr_milestones}")
        require(self.image_prior_weight >= 0, f"image_prior_weight must be >= 0, got {self.image_prior_weight}")
        require(self.student_weight_decay >= 0, "student_weight_decay must be >= 0")
        require(0 <= self.max_recoveries <= 100, f"max_recoveries must be in 0..100, got {self.max_recoveries}")
        require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {shown(self.precision)}")

    @property
    def iterations(self) -> int:
        return self.epochs * self.iters_per_epoch

    def validate_for(self, spec: InputSpec) -> None:
        require(self.patch_size < min(spec.height, spec.width),
                f"patch_size {self.patch_size} must be smaller than the {spec.height}x{spec.width} image")
        require(spec.height % 4 == 0 and spec.width % 4 == 0,
                f"DHBE's sample generator needs image sides divisible by 4, got {spec.height}x{spec.width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExtensionConfig:
    """Base of every departure's config: frozen, validated in `__post_init__` (its own fields) and in
    `validate` (against the official fields it plugs into). `name` is its registry key."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()   # extensions the recipe must also list (before this one acts)
    reads_scan: ClassVar[bool] = False         # the extension reads the scan's report: the recipe needs a scan

    def validate(self, core: DHBEConfig) -> None:
        """Checks that need the official fields (e.g. a size that must hold a batch)."""

    def build(self, trainer: Any) -> Any:
        """The extension's runtime object (defense.dhbe.extensions.base.Extension) for `trainer`."""
        raise NotImplementedError


EXTENSIONS: Registry[type[ExtensionConfig]] = Registry("DHBE extension")


def extension(cls: type[ExtensionConfig]) -> type[ExtensionConfig]:
    """Class decorator: register an extension config under its `name`."""
    EXTENSIONS.register(cls.name)(cls)
    return cls


@dataclass(frozen=True)
class Recipe:
    """The defence's stages: the scan (`scan`, defense/scan; None: no scan) and then the game: the
    official fields (`dhbe`) with a list of departures, applied in this order."""

    dhbe: DHBEConfig = field(default_factory=DHBEConfig)
    extensions: tuple[ExtensionConfig, ...] = ()
    scan: Optional[ScanConfig] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))
        names = [e.name for e in self.extensions]
        require(len(names) == len(set(names)), f"an extension is listed twice: {names}")
        for ext in self.extensions:
            ext.validate(self.dhbe)
            missing = [name for name in ext.requires if name not in names]
            require(not missing, f"extension {ext.name} needs {', '.join(missing)} in the recipe")
            require(not ext.reads_scan or self.scan is not None,
                    f"extension {ext.name} reads the scan's report: the recipe needs its scan (scan=on)")

    # --- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> Optional[ExtensionConfig]:
        return next((e for e in self.extensions if e.name == name), None)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def extension_names(self) -> list[str]:
        return [e.name for e in self.extensions]

    def validate_for(self, spec: InputSpec) -> None:
        self.dhbe.validate_for(spec)

    # --- changing (each returns a new, validated recipe) --------------------------------------------
    def replace(self, **fields: Any) -> "Recipe":
        """New official fields, e.g. `recipe.replace(epochs=2, seed=3)`."""
        return Recipe(replace(self.dhbe, **fields), self.extensions, self.scan)

    def without(self, *names: str) -> "Recipe":
        for name in names:
            EXTENSIONS.get(name)  # an unknown name is an error, not a no-op
        return Recipe(self.dhbe, tuple(e for e in self.extensions if e.name not in names), self.scan)

    def with_extension(self, config: ExtensionConfig) -> "Recipe":
        """Add `config`, or replace the extension of that name where it stands."""
        if config.name in self:
            return Recipe(self.dhbe, tuple(config if e.name == config.name else e for e in self.extensions), self.scan)
        return Recipe(self.dhbe, (*self.extensions, config), self.scan)

    def with_overrides(self, values: Mapping[str, Any]) -> "Recipe":
        """FIELD=VALUE overrides, values as strings or JSON scalars: `lam` (an official field),
        `NAME.FIELD` (a field of extension NAME, or of the scan as `scan.FIELD`; added with its
        defaults if absent), `NAME=off` (remove it) or `NAME=on` (add it with its defaults)."""
        core: dict[str, Any] = {}
        # the scan and every extension by name: its fields, or None when it is off
        sections: dict[str, Optional[dict[str, Any]]] = {
            SCAN: self.scan.to_dict() if self.scan is not None else None, **{e.name: asdict(e) for e in self.extensions}}
        for key, value in values.items():
            name, dot, field_name = key.partition(".")
            if dot:
                cls = ScanConfig if name == SCAN else EXTENSIONS.get(name)
                sections[name] = {**(sections.get(name) or {}), **coerce_fields(cls, {field_name: value})}
            elif key == SCAN or key in EXTENSIONS:
                switch = str(value).lower()
                require(switch in ("on", "off", "true", "false", "1", "0"),
                        f"{'the scan' if key == SCAN else 'extension ' + key} takes on or off, got {str(value)[:40]!r} "
                        f"(set its fields as {key}.FIELD=VALUE)")
                sections[key] = (sections.get(key) or {}) if switch in ("on", "true", "1") else None
            else:
                core.update(coerce_fields(DHBEConfig, {key: value}))
        scan = sections.pop(SCAN)
        return Recipe(replace(self.dhbe, **core), tuple(EXTENSIONS.get(name)(**fields_)
                                                        for name, fields_ in sections.items() if fields_ is not None),
                      ScanConfig(**scan) if scan is not None else None)

    # --- plain data ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {"dhbe": self.dhbe.to_dict(), "extensions": [[e.name, asdict(e)] for e in self.extensions]}
        return {**data, SCAN: self.scan.to_dict()} if self.scan is not None else data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """The inverse of `to_dict`, with every name and value checked (the data may come from a file)."""
        require(isinstance(data, Mapping) and set(data) <= {"dhbe", "extensions", SCAN},
                "a DHBE recipe is an object with the keys dhbe, extensions and (optionally) scan")
        core = data.get("dhbe", {})
        require(isinstance(core, Mapping), "the recipe's dhbe entry must be an object of fields")
        items = data.get("extensions", [])
        require(isinstance(items, list) and all(isinstance(i, (list, tuple)) and len(i) == 2 and isinstance(i[0], str)
                                                and isinstance(i[1], Mapping) for i in items),
                "the recipe's extensions entry must be a list of [name, {fields}] pairs")
        extensions = []
        for name, fields_ in items:
            ext_cls = EXTENSIONS.get(name)
            extensions.append(ext_cls(**coerce_fields(ext_cls, fields_)))
        scan = data.get(SCAN)
        require(scan is None or isinstance(scan, Mapping), "the recipe's scan entry must be an object of fields")
        return cls(DHBEConfig(**coerce_fields(DHBEConfig, core)), tuple(extensions),
                   ScanConfig.from_values(scan) if scan is not None else None)

    def describe(self) -> str:
        game = ", ".join(self.extension_names) or "official DHBE, no extension"
        return f"scan, then {game}" if self.scan is not None else game


SCAN = "scan"   # the recipe's scan stage, in overrides (scan.FIELD=VALUE, scan=on|off) and plain data


def coerce_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values of `cls`'s fields (DHBEConfig, an extension config or the scan's) from strings / JSON values."""
    label = f"DHBE extension {cls.name!r}" if issubclass(cls, ExtensionConfig) else getattr(cls, "FIELDS_LABEL", "DHBE")
    return _coerce_fields(cls, values, label)
