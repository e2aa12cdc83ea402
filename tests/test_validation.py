"""Hostile client updates: thousands of generated malformed updates are rejected without a crash,
and the valid updates beside them are still aggregated exactly."""
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federated.strategies import ObservedStrategy
from federated.validation import validate_update

REFERENCE = {"conv.weight": torch.randn(4, 1, 3, 3), "bn.weight": torch.ones(4), "head.bias": torch.zeros(3)}
REF_NP = {k: v.numpy() for k, v in REFERENCE.items()}


def update(arrays: dict, examples=10, client_id=0, metrics_record=None) -> RecordDict:
    metrics = metrics_record if metrics_record is not None else MetricRecord(
        {"num-examples": examples, "malicious": 0, "client-id": client_id})
    return RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()}), "metrics": metrics})


def nearby(scale=0.01, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}


CORRUPTIONS = ["nan", "inf", "-inf", "shape", "dtype", "missing", "extra", "huge", "empty", "no-arrays",
               "examples-zero", "examples-negative", "examples-nan", "examples-text", "no-metrics", "scalar"]


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(CORRUPTIONS))
    key = draw(st.sampled_from(sorted(REFERENCE)))
    arrays = nearby(scale=draw(st.floats(0.0, 0.05)), seed=draw(st.integers(0, 10_000)))
    examples = draw(st.integers(1, 1000))
    if kind in ("nan", "inf", "-inf"):
        flat = arrays[key].flatten().clone()
        flat[draw(st.integers(0, flat.numel() - 1))] = float(kind)
        arrays[key] = flat.view(arrays[key].shape)
    elif kind == "shape":
        extra_dim = draw(st.integers(1, 3))
        arrays[key] = torch.zeros(arrays[key].numel() + extra_dim)
    elif kind == "dtype":
        arrays[key] = arrays[key].to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32])))
    elif kind == "missing":
        del arrays[key]
    elif kind == "extra":
        arrays[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in REFERENCE))] = torch.zeros(2)
    elif kind == "huge":
        arrays[key] = torch.full_like(arrays[key], draw(st.floats(1e3, 1e30)) * draw(st.sampled_from([-1, 1])))
    elif kind == "empty":
        return RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": examples})})
    elif kind == "no-arrays":
        return RecordDict({"metrics": MetricRecord({"num-examples": examples})})
    elif kind == "no-metrics":
        return RecordDict({"arrays": ArrayRecord(arrays)})
    elif kind == "scalar":
        arrays[key] = torch.tensor(draw(st.floats(-1, 1)))
    bad_examples = {"examples-zero": 0, "examples-negative": -draw(st.integers(1, 99)),
                    "examples-nan": float("nan")}
    if kind in bad_examples:
        return update(arrays, bad_examples[kind])
    if kind == "examples-text":
        return update(arrays, metrics_record=ConfigRecord({"num-examples": "lots"}))
    return update(arrays, examples)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_every_malformed_update_is_rejected(content):
    reason = validate_update(content, REF_NP, max_relative_norm=10.0)
    assert isinstance(reason, str) and reason


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 0.5), st.integers(0, 10_000), st.integers(1, 10_000))
def test_valid_updates_are_accepted(scale, seed, examples):
    assert validate_update(update(nearby(scale, seed), examples), REF_NP, max_relative_norm=10.0) is None


@dataclass
class Reply:
    """The parts of a Flower reply Message that strategies read."""

    content: RecordDict
    error: bool = False
    metadata: object = field(default_factory=lambda: type("M", (), {"src_node_id": 7})())

    def has_error(self) -> bool:
        return self.error


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(malformed(), min_size=1, max_size=6), st.lists(st.integers(1, 500), min_size=2, max_size=5))
def test_aggregation_goes_on_with_the_valid_updates_exactly(bad, sizes):
    strategy = ObservedStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), max_relative_norm=10.0)
    strategy.expect(ArrayRecord(dict(REFERENCE)))
    good = [update(nearby(0.01, seed=i), n, client_id=i) for i, n in enumerate(sizes)]
    replies = [Reply(c) for c in bad] + [Reply(c) for c in good] + [Reply(RecordDict(), error=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    total = sum(sizes)
    for key in REFERENCE:
        expected = sum(n * c["arrays"][key].numpy().astype(np.float64) for n, c in zip(sizes, good)) / total
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert strategy.rounds[1] == {"clients_trained": len(good), "client_failures": 1,
                                  "updates_rejected": len(bad), "malicious_clients": 0}
    assert len(strategy.rejections) == len(bad)


def test_a_round_with_no_valid_update_keeps_the_global_model():
    strategy = ObservedStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), max_relative_norm=10.0)
    strategy.expect(ArrayRecord(dict(REFERENCE)))
    assert strategy.aggregate_train(1, [Reply(update({"x": torch.zeros(1)}))]) == (None, None)
