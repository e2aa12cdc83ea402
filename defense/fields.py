"""One converter from strings / JSON values to a typed dataclass's fields, used by every config
(DHBE's, its extensions', the simulation's): an unknown field or a value of the wrong kind is a
ConfigError naming it."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, Optional

from defense.errors import ConfigError, shown

MAX_SEED = 2**31 - 1   # every seed field and flag: 0..MAX_SEED


def coerce_fields(cls: type, values: Mapping[str, Any], label: Optional[str] = None) -> dict[str, Any]:
    """Convert strings / JSON values to the types of dataclass `cls`'s fields; an unknown field or a
    value of the wrong kind is a ConfigError naming it."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    label = label or getattr(cls, "FIELDS_LABEL", None) or cls.__name__
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown {label} field {shown(key)}; known: {', '.join(sorted(known)) or 'none'}")
        out[key] = _coerce(hints[key], value, f"{label} field {key}")
    return out


def _coerce(kind: Any, value: Any, what: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]: "none" leaves it unset
        if value is None or str(value).lower() == "none":
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, what)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return text in ("1", "true", "yes", "on")
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
            return tuple(_coerce(args[0], v, what) for v in items)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, float) else int(str(value))
        if kind is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        raise ConfigError(f"{what} has an unsupported type {kind}")
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{what} expects a {name}, got {shown(value)}")
