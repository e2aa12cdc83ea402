"""The experiment record a model file carries: which data set and which attack planted its backdoor
(kind, every trigger parameter including seed and place, target, poison rate) and who wrote it.

The experimenter's tools read it to measure a model with its own trigger (`defense.evaluate`, the
sweep, the benchmarks, the federated run's before/after report); flags override it. The defence
never reads it: DHBE gets the model and its input spec only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Optional

from defense.errors import ConfigError, shown
from defense.fields import coerce_fields
from defense.spec import MAX_CLASSES, InputSpec, require
from defense.triggers import ATTACKS, Trigger, TriggerConfig, make_trigger

PATCH_ATTACKS = ("badnets", "dba")


@dataclass(frozen=True)
class Experiment:
    dataset: str = "digits"
    image_size: int = 16
    attack: str = "badnets"
    trigger_size: int = 3
    blend_alpha: float = 0.2
    sig_delta: float = 0.1
    trigger_seed: int = 0            # seeds the trigger pattern (blended noise)
    target: int = 0
    poison_rate: float = 0.1
    place: str = "corner"            # patch triggers: corner (bottom-right), centre, random (per sample)
    pattern: str = "checkerboard"    # patch triggers: checkerboard, tri1, white (defense.triggers.PATTERNS)
    patch_values: Optional[tuple[float, ...]] = None  # patch triggers: the pasted pixel values when the
                                     # attack optimised them (A3FL), in place of `pattern`; C x k x k, row-major
    written_by: str = ""             # the tool that planted the backdoor

    def __post_init__(self) -> None:
        require(self.attack in ATTACKS, f"unknown attack {shown(self.attack)}; choose one of: {', '.join(ATTACKS.names())}")
        require(0 <= self.target < MAX_CLASSES, f"target must be in 0..{MAX_CLASSES - 1}, got {shown(self.target)}")
        require(0 <= self.poison_rate <= 1, f"poison rate must be in [0, 1], got {self.poison_rate}")
        require(4 <= self.image_size <= 512, f"image size must be in 4..512, got {self.image_size}")
        require(self.patch_values is None or self.attack in PATCH_ATTACKS,
                f"patch values are for patch attacks ({', '.join(PATCH_ATTACKS)}), not {self.attack}")
        require(self.patch_values is None or len(self.patch_values) in (self.trigger_size ** 2, 3 * self.trigger_size ** 2),
                f"a {self.trigger_size}x{self.trigger_size} trigger has 1 or 3 x {self.trigger_size ** 2} patch values")
        if self.attack not in PATCH_ATTACKS:
            object.__setattr__(self, "place", "whole image")
            object.__setattr__(self, "pattern", "whole image")
        self.trigger_config()  # validates the trigger's parameters

    def trigger_config(self) -> TriggerConfig:
        patch = self.attack in PATCH_ATTACKS
        return TriggerConfig(self.trigger_size, self.blend_alpha, self.sig_delta, seed=self.trigger_seed,
                             place=self.place if patch else "corner", pattern=self.pattern if patch else "checkerboard",
                             values=self.patch_values)

    def trigger(self, spec: InputSpec) -> Trigger:
        return make_trigger(self.attack, spec, self.trigger_config())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "the experiment record") -> "Experiment":
        """Checked field by field: the record comes from a file."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object")
        return cls(**coerce_fields(cls, data, "experiment record"))

    def with_overrides(self, values: Mapping[str, Any]) -> "Experiment":
        """Flags given on a command line win over the record (None = not given)."""
        given = {k: v for k, v in values.items() if v is not None}
        return replace(self, **coerce_fields(Experiment, given, "experiment")) if given else self


def experiment_of(manifest: Mapping[str, Any], where: str = "the model file") -> Optional[Experiment]:
    """The record in a model manifest, or None for files written before records existed."""
    record = manifest.get("experiment")
    return None if record is None else Experiment.from_dict(record, f"{where}'s experiment record")
