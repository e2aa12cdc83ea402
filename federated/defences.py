"""In-training backdoor defences as Flower strategies: Flower's own `FedAvg` with its aggregation step
replaced by a rule over the clients' updates (local model - global model), as Flower's robust
strategies (FedMedian, Krum) replace it.

- `Flame` (Nguyen et al., USENIX Security 2022): HDBSCAN over the updates' cosine distances keeps the
  majority cluster, the kept updates are clipped to the median update norm, averaged, and Gaussian
  noise of std `noise * median norm` is added.
- `FoolsGold` (Fung et al., RAID 2020): per-client weights from the cosine similarity of the clients'
  update histories (with the paper's pardoning and logit); sybils that push one direction get ~0.
- `RobustLR` (Ozdayi et al., AAAI 2021): per coordinate, the server's learning rate is +1 where at
  least `threshold` clients agree on the update's sign and -1 where fewer do.

Each rule is a pure function of numpy arrays (`flame_combine`, `foolsgold_weights`,
`robust_lr_combine`), tested on hand-made updates; the strategies only flatten the replies, call it
and unflatten the result. The clients' weights are the server's own (federated.validation), and the
client ids FoolsGold keys its history by are bound to their nodes by the reply checker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


@dataclass
class Combined:
    """What a rule made of one round's updates: the aggregate update, and the replies it gave no weight."""
    update: np.ndarray
    excluded: list[int]


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def flame_combine(updates: np.ndarray, noise: float, rng: np.random.Generator) -> Combined:
    """FLAME's steps on a (clients x parameters) matrix of updates: cluster, clip, average, noise."""
    from sklearn.cluster import HDBSCAN

    n = len(updates)
    keep = np.arange(n)
    if n >= 3:
        distances = (1.0 - cosine_similarity(updates.astype(np.float64))).clip(0.0, 2.0)
        np.fill_diagonal(distances, 0.0)
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                         allow_single_cluster=True, copy=True).fit_predict(distances)
        clustered = labels[labels >= 0]
        if len(clustered):  # the majority cluster; with none (all noise) every update stays, as FLAME's fallback
            keep = np.flatnonzero(labels == np.bincount(clustered).argmax())
    norms = np.linalg.norm(updates, axis=1)
    bound = float(np.median(norms))
    scale = np.minimum(1.0, bound / np.maximum(norms[keep], 1e-12))
    update = (updates[keep] * scale[:, None]).mean(axis=0)
    if noise > 0:
        update = update + rng.normal(0.0, noise * bound, size=update.shape).astype(update.dtype)
    return Combined(update, sorted(set(range(n)) - set(keep.tolist())))


def foolsgold_weights(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """FoolsGold's per-client weights in [0, 1] from the clients' summed update histories (the paper's
    Algorithm 1: max similarity to another client, pardoning, 1 - max, rescaling, the logit).

    Where the paper's arithmetic is undefined it is made so, not guessed: a client's own similarity
    never enters its maximum (the official code's `cs - eye` leaves 0 there, which beats every
    negative similarity), and pardoning (cs_ij *= v_i / v_j when v_j > v_i) is applied only for
    v_i > 0, the case the paper meant (a client resembling a sybil); a zero history is similar to
    nobody; 1 - cos below 1e-12 is rounding, so identical histories weigh 0, not (rescaled) 1."""
    n = len(histories)
    if n < 2:
        return np.ones(n)
    similarity = cosine_similarity(histories.astype(np.float64))
    np.fill_diagonal(similarity, -np.inf)
    top = similarity.max(axis=1)
    pardon = (top[None, :] > top[:, None]) & (top[:, None] > 0)   # both maxima positive: a ratio in (0, 1)
    ratio = np.divide(top[:, None], top[None, :], out=np.ones((n, n)), where=pardon)
    similarity = similarity * ratio   # 1 where no pardon
    weights = np.clip(1.0 - similarity.max(axis=1), 0.0, 1.0)
    weights[weights < 1e-12] = 0.0    # identical histories: rounding in the cosine, not dissimilarity
    if weights.max() > 0:
        weights = weights / weights.max()
    weights[weights >= 1.0] = 0.99
    logit = np.full(n, -np.inf)
    positive = weights > 0
    logit[positive] = np.log(weights[positive] / (1.0 - weights[positive]))
    return np.clip(kappa * (logit + 0.5), 0.0, 1.0)


def robust_lr_combine(updates: np.ndarray, weights: np.ndarray, threshold: int) -> Combined:
    """RLR: the weighted mean update, negated on the coordinates where fewer than `threshold`
    clients agree on the sign."""
    agreement = np.abs(np.sign(updates).sum(axis=0))
    learning_rate = np.where(agreement >= threshold, 1.0, -1.0).astype(updates.dtype)
    mean = (updates * (weights / weights.sum())[:, None]).sum(axis=0)
    return Combined(learning_rate * mean, [])


class UpdateRule(FedAvg):
    """FedAvg with the aggregation step replaced by `combine` over the flattened updates. It keeps
    the global model each round's replies are updates of (handed over in `configure_train`)."""

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.global_arrays: Optional[ArrayRecord] = None
        self.excluded: dict[int, list[int]] = {}   # round -> client ids given no weight

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def combine(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
                client_ids: list[int]) -> Combined:
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.global_arrays is None:
            raise RuntimeError(f"{type(self).__name__}: aggregate_train before configure_train")
        keys = list(self.global_arrays.keys())
        base = {key: self.global_arrays[key].numpy() for key in keys}
        floating = [key for key in keys if np.issubdtype(base[key].dtype, np.floating)]
        flat_global = np.concatenate([base[key].ravel().astype(np.float32) for key in floating])
        contents = [message.content for message in valid]
        local = lambda content, key: content.array_records[next(iter(content.array_records))][key].numpy()
        updates = np.stack([np.concatenate([local(c, key).ravel().astype(np.float32) for key in floating]) - flat_global
                            for c in contents])
        metrics = [c.metric_records[next(iter(c.metric_records))] for c in contents]
        weights = np.array([float(m[self.weighted_by_key]) for m in metrics])
        client_ids = [int(m["client-id"]) if "client-id" in m else i for i, m in enumerate(metrics)]
        combined = self.combine(server_round, updates, weights, client_ids)
        self.excluded[server_round] = [client_ids[i] for i in combined.excluded]
        merged, offset, arrays = flat_global + combined.update, 0, ArrayRecord()
        for key in keys:
            if key in floating:
                size = base[key].size
                arrays[key] = Array(merged[offset:offset + size].reshape(base[key].shape).astype(base[key].dtype))
                offset += size
            else:   # integer buffers: FedAvg's rule
                arrays[key] = Array(np.asarray(local(contents[0], key)))
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class Flame(UpdateRule):
    def __init__(self, noise: float = 0.001, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise = noise

    def combine(self, server_round, updates, weights, client_ids):
        return flame_combine(updates, self.noise, np.random.default_rng([self.seed, server_round]))


class FoolsGold(UpdateRule):
    def __init__(self, kappa: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kappa = kappa
        self.history: dict[int, np.ndarray] = {}

    def combine(self, server_round, updates, weights, client_ids):
        for client_id, update in zip(client_ids, updates):
            self.history[client_id] = self.history.get(client_id, 0.0) + update
        trust = foolsgold_weights(np.stack([self.history[c] for c in client_ids]), self.kappa)
        excluded = [i for i, w in enumerate(trust) if w <= 0]
        if trust.sum() <= 0:
            return Combined(np.zeros_like(updates[0]), excluded)
        return Combined((updates * (trust / trust.sum())[:, None]).sum(axis=0), excluded)


class RobustLR(UpdateRule):
    def __init__(self, threshold: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def combine(self, server_round, updates, weights, client_ids):
        return robust_lr_combine(updates, weights, min(self.threshold, len(updates)))
