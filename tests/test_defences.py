"""The in-training defences (federated/defences.py) do what their papers say, on hand-made updates,
and run as Flower strategies on real replies."""
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from federated.defences import (Flame, FoolsGold, RobustLR, flame_combine, foolsgold_weights,
                                robust_lr_combine)


def benign_and_malicious(n_benign=8, n_malicious=2, dim=200, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    benign = direction + 0.3 * rng.normal(size=(n_benign, dim))
    backdoor = rng.normal(size=dim)
    malicious = backdoor + 0.05 * rng.normal(size=(n_malicious, dim))
    return np.vstack([benign, malicious]).astype(np.float32), direction, backdoor


def test_flame_drops_the_outlier_cluster_and_clips_to_the_median_norm():
    updates, direction, backdoor = benign_and_malicious()
    fedavg = updates.mean(axis=0)
    updates[0] *= 50   # a benign client with a huge update: kept (same direction) but clipped
    result = flame_combine(updates, noise=0.0, rng=np.random.default_rng(0))
    # the attackers are out; the kept cluster is a majority (HDBSCAN may leave a benign straggler out, as in FLAME)
    assert {8, 9} <= set(result.excluded) and 10 - len(result.excluded) >= 10 // 2 + 1
    median = np.median(np.linalg.norm(updates, axis=1))
    assert np.linalg.norm(result.update) <= median + 1e-4
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos(result.update, direction) > 0.95 and abs(cos(result.update, backdoor)) < 0.2
    assert cos(fedavg, backdoor) > cos(result.update, backdoor) + 0.1


def test_flame_adds_noise_scaled_by_the_median_norm():
    updates, _, _ = benign_and_malicious(n_malicious=0)
    quiet = flame_combine(updates, 0.0, np.random.default_rng(1)).update
    noisy = flame_combine(updates, 0.01, np.random.default_rng(1)).update
    median = np.median(np.linalg.norm(updates, axis=1))
    assert np.std(noisy - quiet) == pytest.approx(0.01 * median, rel=0.15)


def test_foolsgold_gives_sybils_no_weight_and_honest_clients_full_weight():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(6, 100))                     # non-IID honest clients: dissimilar histories
    sybil = rng.normal(size=100)
    sybils = sybil + 0.01 * rng.normal(size=(3, 100))      # three sybils pushing one direction
    weights = foolsgold_weights(np.vstack([honest, sybils]))
    assert (weights[6:] < 0.05).all() and (weights[:6] > 0.9).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000), st.sampled_from(["random", "opposite", "zero", "identical", "orthogonal"]))
def test_foolsgold_weights_follow_the_paper_on_any_update_geometry(n, seed, geometry):
    """Weights in [0, 1], no division by zero or NaN on any geometry; clients that resemble nobody
    (opposite pairs, orthogonal, a zero history) keep full weight, identical ones get none. The
    official code's `cs - eye` let a client's own 0 into its maximum and pardoning divide by it:
    an honest client of an opposite pair got weight 0."""
    rng = np.random.default_rng(seed)
    histories = rng.normal(size=(n, 30))
    if geometry == "opposite":
        histories[1] = -histories[0] * rng.uniform(0.1, 10)
        histories = histories[:2]
    elif geometry == "zero":
        histories[0] = 0.0
    elif geometry == "identical":
        histories[:] = histories[0]
    elif geometry == "orthogonal":
        histories = np.eye(n, 30) * rng.uniform(0.1, 10, size=(n, 1))
    with np.errstate(all="raise"):
        weights = foolsgold_weights(histories)
    assert weights.shape == (len(histories),) and np.isfinite(weights).all()
    assert ((0 <= weights) & (weights <= 1)).all()
    if geometry in ("opposite", "orthogonal"):
        assert (weights == 1.0).all(), weights
    if geometry == "identical":
        assert (weights == 0.0).all(), weights
    if geometry == "zero":
        assert weights[0] == 1.0, weights


def test_foolsgold_never_pardons_a_client_whose_best_match_is_negative():
    """A client dissimilar to everyone (its maximum < 0): pardoning would multiply a negative
    similarity by a negative ratio and turn it into +2.8 (weight 0); it keeps full weight."""
    histories = np.array([[1.0, 0.0, 0.0], [-0.9, 0.436, 0.0], [-0.6, -0.8, 0.0]])
    assert (foolsgold_weights(histories) == 1.0).all()


def test_robust_lr_flips_the_learning_rate_where_signs_do_not_agree():
    updates = np.array([[1.0, 1.0, -2.0], [1.0, -1.0, -2.0], [1.0, 1.0, 2.0], [1.0, -1.0, -2.0]])
    result = robust_lr_combine(updates, np.ones(4), threshold=2)
    # coordinate 0: 4 of 4 agree -> +mean; coordinate 1: sum of signs 0 -> -mean (= 0); coordinate 2: |-3+1| = 2 -> kept
    assert np.allclose(result.update, [1.0, 0.0, -1.0])
    flipped = robust_lr_combine(updates, np.ones(4), threshold=3)
    assert np.allclose(flipped.update, [1.0, 0.0, 1.0])   # coordinate 2 now lacks agreement: negated


@dataclass
class Reply:
    """The parts of a Flower reply Message that strategies read."""
    content: RecordDict

    def has_error(self) -> bool:
        return False


def reply(arrays: dict, client_id: int, examples: int = 10) -> Reply:
    return Reply(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                             "metrics": MetricRecord({"num-examples": examples, "client-id": client_id})}))


@pytest.mark.parametrize("strategy", [Flame(noise=0.0), FoolsGold(), RobustLR(threshold=4)])
def test_the_strategies_aggregate_real_replies_into_the_global_layout(strategy):
    updates, direction, _ = benign_and_malicious(dim=12)
    global_arrays = {"w": np.zeros((3, 4), np.float32), "b": np.ones(2, np.float32)}
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})  # as configure_train keeps it
    replies = [reply({"w": u.reshape(3, 4), "b": np.ones(2, np.float32)}, i) for i, u in enumerate(updates)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert set(arrays.keys()) == {"w", "b"} and arrays["w"].numpy().shape == (3, 4)
    assert np.allclose(arrays["b"].numpy(), 1.0)
    assert float(np.corrcoef(arrays["w"].numpy().ravel(), direction)[0, 1]) > 0.5
    if isinstance(strategy, Flame):
        assert {8, 9} <= set(strategy.excluded[1])
