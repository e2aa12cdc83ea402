"""Shared helpers for the Markdown tables the benchmarks write, and where they write them (--out)."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Optional, Sequence

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


# --- where a benchmark writes ----------------------------------------------------------------------
BENCH_RUNS = Path("runs/bench")   # the default: a folder of the user's, never the committed tables
COMMITTED = Path("benchmarks/results")


def add_out_argument(parser: argparse.ArgumentParser, name: str, suffixes: Sequence[str] = (".md", ".json")) -> None:
    """`--out STEM`: the files a benchmark writes are STEM + each of `suffixes`; the default is
    runs/bench/NAME, so a run never overwrites a committed table unless asked to with
    `--out benchmarks/results/NAME`. A NAME with a <placeholder> (e.g. `default_table_<cases>`) leaves
    the default to the benchmark: `out_stem(args, resolved_name)`."""
    files = ", ".join(f"STEM{suffix}" for suffix in suffixes)
    parser.add_argument("--out", metavar="STEM", default=None if "<" in name else str(BENCH_RUNS / name),
                        help=f"files are written as {files} (default: {BENCH_RUNS / name}); to update the "
                             f"committed table pass --out {COMMITTED / name}")
    parser.set_defaults(out_suffixes=tuple(suffixes))


def out_stem(args: argparse.Namespace, name: Optional[str] = None) -> Path:
    """The --out stem as a Path (runs/bench/NAME where --out was not given and the default is left to the
    benchmark), its parent folder created. A known file suffix given by mistake (`--out x.md`) is dropped;
    a dot in a stem (`dhbe_federated_lam0.5`) is kept."""
    stem = Path(args.out) if args.out else BENCH_RUNS / (name or "out")
    if stem.suffix in getattr(args, "out_suffixes", ()):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem


def out_file(stem: Path, suffix: str) -> Path:
    """STEM + suffix (not Path.with_suffix: a stem may hold a dot, e.g. `..._lam0.5`)."""
    return stem.with_name(stem.name + suffix)



def write_output(args: argparse.Namespace, suffix: str, content: object) -> Path:
    """Write `content` (text, or a JSON-able object for ".json") atomically to the --out stem + `suffix`,
    say where, and return the path."""
    from defense.fileio import atomic_write_json, atomic_write_text

    out = out_file(out_stem(args), suffix)
    atomic_write_json(out, content) if suffix == ".json" else atomic_write_text(out, str(content))
    print(f"wrote {out}")
    return out
