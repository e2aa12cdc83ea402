"""Hostile client replies: generated whole replies (record layout, metric keys and values, example
counts, arrays) are rejected or normalised without an exception inside the server, the valid replies
beside them are aggregated exactly with the server's own weights, and one accepted reply moves the
FedAvg aggregate by at most its weight share times the update-norm bound."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from defense.errors import ConfigError
from federated.config import SimulationConfig
from federated.strategies import AGGREGATIONS, ObservedStrategy, build_strategy
from federated.validation import MAX_EXAMPLES, RejectedReply, ReplyChecker

REFERENCE = {"conv.weight": torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)),
             "bn.weight": torch.ones(4), "head.bias": torch.zeros(3)}
REF_NORM = float(np.sqrt(sum(float((v.double() ** 2).sum()) for v in REFERENCE.values())))
CLIENTS = 8
SIZES = [10, 20, 30, 40, 50, 60, 70, 80]
BOUND = 10.0


def checker(weighting: str = "known") -> ReplyChecker:
    check = ReplyChecker(CLIENTS, BOUND, weighting, SIZES)
    check.expect(ArrayRecord(dict(REFERENCE)))
    return check


def reply(arrays: dict, examples=10, client_id=0, metrics=None, **extra_records) -> RecordDict:
    metrics = metrics if metrics is not None else MetricRecord({"num-examples": examples, "client-id": client_id})
    return RecordDict({"arrays": ArrayRecord(dict(arrays)), "metrics": metrics, **extra_records})


def nearby(scale=0.01, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}


ARRAY_CORRUPTIONS = ["nan", "inf", "-inf", "shape", "dtype", "missing", "extra", "huge", "scalar", "empty",
                     "unchanged", "below-float32"]
LAYOUT_CORRUPTIONS = ["no-arrays", "no-metrics", "metrics-as-config", "extra-arrays", "extra-metrics",
                      "extra-config", "arrays-as-metrics", "nothing"]
METRIC_CORRUPTIONS = ["missing-key", "extra-key", "id-nan", "id-inf", "id-negative", "id-too-large", "id-float",
                      "id-list", "examples-zero", "examples-negative", "examples-fraction", "examples-1e30",
                      "examples-huge-int", "examples-nan", "examples-list", "malicious-nan", "malicious-list"]
CORRUPTIONS = ARRAY_CORRUPTIONS + LAYOUT_CORRUPTIONS + METRIC_CORRUPTIONS


@st.composite
def hostile(draw):
    """(kind, reply): a reply no server should aggregate."""
    kind = draw(st.sampled_from(CORRUPTIONS))
    key = draw(st.sampled_from(sorted(REFERENCE)))
    arrays = nearby(scale=draw(st.floats(0.0, 0.05)), seed=draw(st.integers(0, 10_000)))
    examples, client_id = draw(st.integers(1, 1000)), draw(st.integers(0, CLIENTS - 1))
    good_metrics = {"num-examples": examples, "client-id": client_id}
    if kind in ("nan", "inf", "-inf"):
        flat = arrays[key].flatten().clone()
        flat[draw(st.integers(0, flat.numel() - 1))] = float(kind)
        arrays[key] = flat.view(arrays[key].shape)
    elif kind == "shape":
        arrays[key] = torch.zeros(arrays[key].numel() + draw(st.integers(1, 3)))
    elif kind == "dtype":
        arrays[key] = arrays[key].to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32])))
    elif kind == "missing":
        del arrays[key]
    elif kind == "extra":
        arrays[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in REFERENCE))] = torch.zeros(2)
    elif kind == "huge":
        arrays[key] = torch.full_like(arrays[key], draw(st.floats(1e3, 1e30)) * draw(st.sampled_from([-1, 1])))
    elif kind == "scalar":
        arrays[key] = torch.tensor(draw(st.floats(-1, 1)))
    elif kind == "unchanged":          # the global model sent back: an update of norm zero
        arrays = dict(REFERENCE)
    elif kind == "below-float32":      # a change whose square vanishes in float32 (norm 0 there, > 0 in float64):
        arrays = {k: v + (v == 0) * 1e-30 for k, v in REFERENCE.items()}   # only zero entries keep a 1e-30
    elif kind == "empty":
        return kind, RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(good_metrics)})
    if kind in ARRAY_CORRUPTIONS:
        return kind, reply(arrays, examples, client_id)
    layouts = {
        "no-arrays": lambda: RecordDict({"metrics": MetricRecord(good_metrics)}),
        "no-metrics": lambda: RecordDict({"arrays": ArrayRecord(arrays)}),
        "metrics-as-config": lambda: RecordDict({"arrays": ArrayRecord(arrays), "metrics": ConfigRecord(good_metrics)}),
        "extra-arrays": lambda: reply(arrays, examples, client_id, more=ArrayRecord({"w": torch.zeros(2)})),
        "extra-metrics": lambda: reply(arrays, examples, client_id, more=MetricRecord({"loss": 0.5})),
        "extra-config": lambda: reply(arrays, examples, client_id, note=ConfigRecord({"malicious": "no"})),
        "arrays-as-metrics": lambda: RecordDict({"arrays": MetricRecord({"w": 1.0}), "metrics": MetricRecord(good_metrics)}),
        "nothing": lambda: RecordDict(),
    }
    if kind in layouts:
        return kind, layouts[kind]()
    dropped = draw(st.sampled_from(sorted(good_metrics)))
    metric_values = {
        "missing-key": {k: v for k, v in good_metrics.items() if k != dropped},
        "extra-key": {**good_metrics, draw(st.sampled_from(["malicious", "loss", "num_examples"])): 1},
        "id-nan": {**good_metrics, "client-id": float("nan")},
        "id-inf": {**good_metrics, "client-id": float("inf")},
        "id-negative": {**good_metrics, "client-id": -draw(st.integers(1, 10**6))},
        "id-too-large": {**good_metrics, "client-id": CLIENTS + draw(st.integers(0, 10**6))},
        "id-float": {**good_metrics, "client-id": draw(st.floats(0, CLIENTS - 1))},
        "id-list": {**good_metrics, "client-id": [client_id, client_id]},
        "examples-zero": {**good_metrics, "num-examples": 0},
        "examples-negative": {**good_metrics, "num-examples": -draw(st.integers(1, 99))},
        "examples-fraction": {**good_metrics, "num-examples": draw(st.floats(0.001, 0.999))},
        "examples-1e30": {**good_metrics, "num-examples": 1e30},
        "examples-huge-int": {**good_metrics, "num-examples": MAX_EXAMPLES + draw(st.integers(1, 10**12))},
        "examples-nan": {**good_metrics, "num-examples": float("nan")},
        "examples-list": {**good_metrics, "num-examples": [examples]},
        "malicious-nan": {**good_metrics, "malicious": float("nan")},
        "malicious-list": {**good_metrics, "malicious": [1.0, 2.0]},
    }
    return kind, reply(arrays, metrics=MetricRecord(metric_values[kind]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_every_hostile_reply_is_rejected_with_a_reason(case):
    kind, content = case
    with pytest.raises(RejectedReply) as rejected:
        checker().normalise(content, node=7)
    assert str(rejected.value), kind


def test_a_change_float32_cannot_square_is_zero_there_and_rejected():
    """The below-float32 case is what it claims: > 0 in float64, 0 as float32 computes the norm."""
    arrays = {k: v + (v == 0) * 1e-30 for k, v in REFERENCE.items()}
    update = arrays["head.bias"].double() - REFERENCE["head.bias"].double()
    assert float(update.norm()) > 0 and float(np.linalg.norm((arrays["head.bias"] - REFERENCE["head.bias"]).numpy())) == 0
    with pytest.raises(RejectedReply, match="zero"):
        checker().normalise(reply(arrays), node=3)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 0.5), st.integers(0, 10_000), st.integers(1, MAX_EXAMPLES), st.integers(0, CLIENTS - 1))
def test_valid_replies_are_rebuilt_with_the_servers_weight(scale, seed, examples, client_id):
    content, cid = checker().normalise(reply(nearby(scale, seed), examples, client_id), node=3)
    assert cid == client_id
    assert sorted(content.keys()) == ["arrays", "metrics"]
    assert dict(content["metrics"]) == {"client-id": client_id, "num-examples": min(examples, SIZES[client_id])}
    equal, _ = checker("equal").normalise(reply(nearby(scale, seed), examples, client_id), node=3)
    assert equal["metrics"]["num-examples"] == 1


def test_a_node_speaks_for_one_client_id_and_an_id_for_one_node():
    check = checker()
    check.normalise(reply(nearby(), 5, client_id=2), node=11)
    with pytest.raises(RejectedReply, match="already belongs to node 11"):
        check.normalise(reply(nearby(), 5, client_id=2), node=12)
    with pytest.raises(RejectedReply, match="spoke as client-id 2"):
        check.normalise(reply(nearby(), 5, client_id=3), node=11)
    check.normalise(reply(nearby(seed=1), 5, client_id=2), node=11)   # the same node, next round


@dataclass
class Reply:
    """The parts of a Flower reply Message that strategies read (content can be replaced, as on a Message)."""

    content: RecordDict
    error: bool = False
    metadata: object = field(default_factory=lambda: type("M", (), {"src_node_id": 7})())

    def has_error(self) -> bool:
        return self.error


def node(number: int) -> object:
    return type("M", (), {"src_node_id": number})()


def observed(weighting: str = "known", attackers=frozenset()) -> ObservedStrategy:
    strategy = ObservedStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), checker(weighting),
                                lambda server_round: frozenset(attackers))
    return strategy


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile(), min_size=1, max_size=6), st.lists(st.integers(1, 500), min_size=2, max_size=5))
def test_aggregation_goes_on_with_the_valid_replies_exactly(bad, claimed):
    strategy = observed(attackers={1})
    good = [reply(nearby(0.01, seed=i), n, client_id=i) for i, n in enumerate(claimed)]
    replies = ([Reply(c, metadata=node(100 + i)) for i, (_, c) in enumerate(bad)]
               + [Reply(c, metadata=node(i)) for i, c in enumerate(good)] + [Reply(RecordDict(), error=True)])
    arrays, _ = strategy.aggregate_train(1, replies)
    weights = [min(n, SIZES[i]) for i, n in enumerate(claimed)]
    for key in REFERENCE:
        expected = sum(w * c["arrays"][key].numpy().astype(np.float64) for w, c in zip(weights, good)) / sum(weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert strategy.rounds[1] == {"clients_sampled": len(replies), "clients_trained": len(good), "client_failures": 1, "client_timeouts": 0,
                                  "updates_rejected": len(bad), "malicious_clients": 1}
    assert len(strategy.rejections) == len(bad)


def far_update(direction_seed: int, share_of_bound: float = 0.999) -> dict:
    """An update at the norm bound: ||L - G|| = share * BOUND * ||G||."""
    g = torch.Generator().manual_seed(direction_seed)
    directions = {k: torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}
    norm = float(np.sqrt(sum(float((d.double() ** 2).sum()) for d in directions.values())))
    return {k: REFERENCE[k] + directions[k] * (share_of_bound * BOUND * REF_NORM / norm) for k in REFERENCE}


def deviation(weighting: str, attacker: int, direction_seed: int) -> tuple[float, float]:
    """(||A - A_null||, share * bound * ||G||): A the FedAvg aggregate with one attacker claiming a
    vast example count, A_null the same round with the attacker's update replaced by no change."""
    honest = [reply(nearby(0.01, seed=i), SIZES[i], client_id=i) for i in range(CLIENTS) if i != attacker]
    results = []
    for attack in (far_update(direction_seed), dict(REFERENCE)):
        strategy = observed(weighting)
        replies = [Reply(c, metadata=node(i)) for i, c in enumerate(honest)]
        replies.append(Reply(reply(attack, MAX_EXAMPLES, client_id=attacker), metadata=node(99)))
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append({k: arrays[k].numpy().astype(np.float64) for k in REFERENCE})
    moved = float(np.sqrt(sum(((results[0][k] - results[1][k]) ** 2).sum() for k in REFERENCE)))
    share = SIZES[attacker] / sum(SIZES) if weighting == "known" else 1 / CLIENTS
    return moved, share * BOUND * REF_NORM


@pytest.mark.parametrize("weighting", ["known", "equal"])
@pytest.mark.parametrize("attacker", [0, 7])
def test_one_accepted_reply_moves_the_aggregate_by_at_most_its_share_of_the_bound(weighting, attacker):
    for direction_seed in range(5):
        moved, bound = deviation(weighting, attacker, direction_seed)
        assert moved <= bound * (1 + 1e-6), (moved, bound)
        assert moved >= 0.9 * bound   # the update at the bound does move it that far: the check can fail


def test_a_round_with_no_valid_reply_keeps_the_global_model():
    strategy = observed()
    assert strategy.aggregate_train(1, [Reply(reply({"x": torch.zeros(1)}))]) == (None, None)


UPDATE_KINDS = ["normal", "unchanged", "below-float32", "at-the-bound", "identical", "opposite", "tiny"]


def extreme_replies(kinds: list[str], seed: int) -> list[RecordDict]:
    """One reply per client: a plain update, the global model sent back, a change float32 cannot
    square, an update at the norm bound, a copy of the previous client's update, its negation, or a
    change of 1e-6 of the global norm."""
    updates: list[dict] = []
    for i, kind in enumerate(kinds):
        previous = updates[-1] if updates else {k: torch.zeros_like(v) for k, v in REFERENCE.items()}
        if kind == "normal":
            update = {k: v - REFERENCE[k] for k, v in nearby(0.05, seed + i).items()}
        elif kind == "unchanged":
            update = {k: torch.zeros_like(v) for k, v in REFERENCE.items()}
        elif kind == "below-float32":    # on the zero entries (head.bias): 1e-30 survives there, squared it does not
            update = {k: (v == 0) * 1e-30 for k, v in REFERENCE.items()}
        elif kind == "at-the-bound":
            update = {k: v - REFERENCE[k] for k, v in far_update(seed + i).items()}
        elif kind == "identical":
            update = previous
        elif kind == "opposite":
            update = {k: -v for k, v in previous.items()}
        else:
            update = {k: v - REFERENCE[k] for k, v in nearby(1e-6 * REF_NORM, seed + i).items()}
        updates.append(update)
    return [reply({k: REFERENCE[k] + u[k] for k in REFERENCE}, SIZES[i], client_id=i) for i, u in enumerate(updates)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(AGGREGATIONS)), st.lists(st.sampled_from(UPDATE_KINDS), min_size=1, max_size=CLIENTS),
       st.integers(0, 2), st.integers(0, 1000))
def test_no_valid_but_extreme_reply_raises_inside_any_aggregation(aggregation, kinds, malicious, seed):
    """Every --aggregation, fed replies that pass or fail the checker at its edges (zero, below
    float32, at the bound, identical, opposite): the round aggregates to finite arrays in the global
    layout or keeps the global model; a zero update is rejected with its reason, never divided by."""
    try:
        config = SimulationConfig(clients=CLIENTS, malicious=malicious, aggregation=aggregation, max_update_norm=BOUND)
    except ConfigError:       # e.g. Bulyan's 4f + 3 clients: refused before a run starts
        assume(False)
    strategy = ObservedStrategy(build_strategy(config), checker(), lambda server_round: frozenset())
    arrays = ArrayRecord(dict(REFERENCE))
    strategy.expect(arrays)
    inner = strategy.inner          # what configure_train keeps of the global model (it needs a live Grid)
    if hasattr(inner, "current_arrays"):
        inner.current_arrays = arrays
    if hasattr(inner, "global_arrays"):
        inner.global_arrays = arrays
    replies = [Reply(c, metadata=node(i)) for i, c in enumerate(extreme_replies(kinds, seed))]
    with np.errstate(divide="raise", invalid="raise"):
        result, _ = strategy.aggregate_train(1, replies)
    zero = sum(kind in ("unchanged", "below-float32") or (kind in ("identical", "opposite") and i and kinds[i - 1] in
               ("unchanged", "below-float32")) for i, kind in enumerate(kinds))
    assert strategy.rounds[1]["updates_rejected"] >= zero
    assert all("zero" in r["reason"] for r in strategy.rejections)
    if result is not None:
        assert sorted(result.keys()) == sorted(REFERENCE)
        for key, ref in REFERENCE.items():
            value = result[key].numpy()
            assert value.shape == tuple(ref.shape) and np.isfinite(value).all(), key
