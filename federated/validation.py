"""Server-side checks on every client update before aggregation: a hostile client can send anything.

An update must carry an ArrayRecord under "arrays" with exactly the global model's keys, shapes and
dtypes, only finite values, a positive finite "num-examples", and an update norm ||L - G|| of at most
`max_relative_norm` * ||G||. Anything else is rejected with a reason; the round goes on without it."""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np

LOG = logging.getLogger("federated.validation")


def _arrays(record: Any) -> Optional[dict[str, np.ndarray]]:
    try:
        return {key: np.asarray(record[key].numpy()) for key in record.keys()}
    except Exception:
        return None


def validate_update(content: Any, reference: dict[str, np.ndarray], max_relative_norm: float) -> Optional[str]:
    """None if the update is acceptable, else the reason it is rejected."""
    try:
        if "arrays" not in content:
            return "no 'arrays' record"
        arrays = _arrays(content["arrays"])
    except Exception as exc:  # a record that cannot even be read
        return f"unreadable record ({type(exc).__name__})"
    if arrays is None:
        return "unreadable arrays"
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        return f"keys differ (missing {sorted(missing)[:2]}, extra {sorted(extra)[:2]})"
    squared_update, squared_global = 0.0, 0.0
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            return f"{key}: shape {value.shape} != {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}"
        if value.dtype.kind == "f":
            if not np.isfinite(value).all():
                return f"{key}: non-finite values"
            diff = value.astype(np.float64) - ref.astype(np.float64)
            squared_update += float(np.square(diff).sum())
            squared_global += float(np.square(ref.astype(np.float64)).sum())
    try:
        examples = content["metrics"]["num-examples"]
    except Exception:
        return "no 'num-examples' metric"
    if isinstance(examples, bool) or not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples {examples!r} is not a positive number"
    norm, reference_norm = math.sqrt(squared_update), math.sqrt(squared_global)
    if not math.isfinite(norm) or norm > max_relative_norm * max(reference_norm, 1e-12):
        return f"update norm {norm:.3g} exceeds {max_relative_norm} x global norm {reference_norm:.3g}"
    return None
