"""Split a training set across clients: IID or label-skewed Dirichlet (Hsu et al. 2019)."""
from __future__ import annotations

import numpy as np
import torch

from defense.spec import require
from defense.errors import shown


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    require(num_clients <= num_samples, f"{num_clients} clients need at least as many samples, got {num_samples}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: torch.Tensor, num_clients: int, alpha: float, seed: int,
                        min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Per class, proportions ~ Dir(alpha) over clients; redrawn until every client has `min_size`."""
    require(alpha > 0, f"Dirichlet alpha must be > 0, got {alpha}")
    labels_np = labels.numpy()
    require(num_clients * min_size <= len(labels_np), f"{num_clients} clients need at least {num_clients * min_size} samples")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels_np):
            members = rng.permutation(np.flatnonzero(labels_np == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give each of {num_clients} clients {min_size} samples with alpha={alpha}; raise alpha")


def partition(kind: str, labels: torch.Tensor, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    raise ValueError(f"unknown partition {shown(kind)}")
