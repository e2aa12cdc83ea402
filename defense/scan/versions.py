"""Which earlier versions of a model the scanner weighs, and where a federated run folder keeps them
(its final model `final.json`, every round's global model `models/round-NNN.json`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from defense.errors import ConfigError
from defense.modelio import LoadedModel

EARLIER_VERSIONS = 3   # earlier global models the scan weighs: at 1/4, 1/2 and 3/4 of the rounds so far
MAX_ROUND_FILES = 100_000
ROUND_FILE = re.compile(r"round-(\d{3,6})\.json")


def earlier_rounds(last_round: int, available: Iterable[int], count: int = EARLIER_VERSIONS) -> list[int]:
    """The kept rounds before `last_round` nearest to 1/(count+1), 2/(count+1), ... of the way from the
    first kept one to it (oldest first, no repeats): a 20-round run's scan weighs rounds 5, 10, 15."""
    kept = sorted(r for r in set(available) if 1 <= r < last_round)
    if not kept:
        return []
    start = kept[0] - 1
    picked: list[int] = []
    for k in range(1, count + 1):
        nearest = min(kept, key=lambda r: (abs(r - start - (last_round - start) * k / (count + 1)), r))
        if nearest not in picked:
            picked.append(nearest)
    return sorted(picked)


def round_model_file(root: Path, number: int) -> Path:
    """The manifest of round `number`'s global model in a run folder."""
    return root / "models" / f"round-{number:03d}.json"


def run_folder_versions(root: Path) -> tuple[Path, list[Path]]:
    """A run folder's final model and the earlier global models the server hook would weigh, checked as
    hostile: plain files and folders inside `root` only (no links out), round files by name only."""
    if not root.is_dir() or root.is_symlink():
        raise ConfigError(f"--run {root}: not a run folder (no such folder, or a link)")
    final = root / "final.json"
    if not final.is_file() or final.is_symlink():
        raise ConfigError(f"--run {root}: no final.json (an unfinished run, or not a run folder)")
    models = root / "models"
    if not models.exists():
        return final, []
    if not models.is_dir() or models.is_symlink():
        raise ConfigError(f"--run {root}: models/ is not a plain folder")
    rounds: dict[int, Path] = {}
    for count, entry in enumerate(models.iterdir()):
        if count >= MAX_ROUND_FILES:
            raise ConfigError(f"--run {root}: more than {MAX_ROUND_FILES} files in models/")
        match = ROUND_FILE.fullmatch(entry.name)
        if not match:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise ConfigError(f"--run {root}: models/{entry.name[:80]} is not a plain file")
        rounds[int(match.group(1))] = entry
    last = max(rounds, default=0)   # the final model is the last recorded round's
    return final, [rounds[r] for r in earlier_rounds(last, [r for r in rounds if r < last])]


def check_earlier_versions(model: LoadedModel, earlier: Sequence[LoadedModel],
                           names: Optional[Sequence[str]] = None) -> None:
    """Every earlier version must be the same network on the same input spec as the model (the
    scan CLI and the purification job both refuse another, in one line naming what differs)."""
    for i, version in enumerate(earlier):
        name = names[i] if names else str(i + 1)
        if version.model_name != model.model_name:
            raise ConfigError(f"earlier version {name} is another network ({version.model_name[:40]}) than the "
                              f"model ({model.model_name})")
        if version.spec != model.spec:
            theirs, ours = version.spec.to_dict(), model.spec.to_dict()
            differing = "; ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in theirs if theirs[k] != ours[k])
            raise ConfigError(f"earlier version {name} has another input spec than the model: {differing[:300]}")
