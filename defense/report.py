"""The one Markdown-table helper and the one headless-figure helper of the project (run folders,
sweeps, benchmarks)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from defense.fileio import atomic_path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table; None cells print as n/a."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("n/a" if cell is None else str(cell) for cell in row) + " |")
    return lines


@contextmanager
def figure(path: str | Path, figsize: tuple[float, float] = (6, 3.5)) -> Iterator[Any]:
    """A matplotlib axes on a headless (Agg) figure, saved atomically to `path` as PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
