"""Shared helpers for the Markdown tables the benchmarks write."""
from __future__ import annotations

import statistics

UNSCALED = ("wall_s", "der")  # every other metric is a rate in [0, 1], shown as a percentage


def group_rows(rows: list[dict], keys: tuple[str, ...] = ("attack", "defence")) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def cell(members: list[dict], key: str, spread: bool = False) -> str:
    """Mean over the group (and ± half the range with `spread`); 'n/a' where no member has the key."""
    values = [m[key] for m in members if m.get(key) is not None]
    if not values:
        return "n/a"
    scale = 1 if key in UNSCALED else 100
    digits = 2 if key == "der" else 1
    text = f"{scale * statistics.mean(values):.{digits}f}"
    if spread:
        text += f" ± {scale * (max(values) - min(values)) / 2:.{digits}f}"
    return text
