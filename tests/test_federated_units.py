import numpy as np
import pytest
import torch

from defense.data import Split
from defense.errors import ConfigError
from federated.attacks import attacker_trigger, boost_update, global_trigger, poison_partition
from federated.config import SimulationConfig
from federated.partition import dirichlet_partition, iid_partition
from federated.strategies import AGGREGATIONS, build_strategy


def test_iid_partition_sizes_and_determinism():
    parts = iid_partition(103, 10, seed=1)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=1)))


def test_dirichlet_partition_is_skewed_and_complete():
    labels = torch.arange(1000) % 10
    parts = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    dominant = [np.bincount(labels.numpy()[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.5  # small alpha: most clients hold mostly one class
    iid_dominant = [np.bincount(labels.numpy()[p], minlength=10).max() / len(p)
                    for p in dirichlet_partition(labels, 10, alpha=1000.0, seed=0)]
    assert np.mean(iid_dominant) < 0.2


def test_malicious_clients_are_seeded_and_counted():
    config = SimulationConfig(clients=10, malicious=3, seed=4)
    assert config.malicious_clients() == SimulationConfig(clients=10, malicious=3, seed=4).malicious_clients()
    assert len(set(config.malicious_clients())) == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"malicious": 11}, "--malicious"), ({"aggregation": "bulyan", "clients": 10, "malicious": 2}, "bulyan needs"),
    ({"aggregation": "krum", "clients": 5, "malicious": 2}, "krum needs"), ({"boost": 0.5}, "--boost"),
    ({"poison_rate": 2.0}, "--poison-rate"), ({"rounds": 0}, "--rounds"),
])
def test_invalid_configurations_are_refused_with_the_rule(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**kwargs)


def test_each_aggregation_maps_onto_a_flower_strategy():
    import flwr.serverapp.strategy as flower

    for name in AGGREGATIONS.names():
        strategy = build_strategy(SimulationConfig(clients=12, malicious=2, aggregation=name))
        # Flower's own class, or (the in-training defences) Flower's FedAvg with its aggregation step replaced
        assert isinstance(strategy, flower.Strategy) and (type(strategy).__module__.startswith("flwr.")
                                                          or isinstance(strategy, flower.FedAvg)), name


def test_attacks_poison_the_partition(digits16):
    spec = digits16.spec
    data = Split(digits16.train.images[:100], digits16.train.labels[:100])
    for attack in ("badnets", "blended", "sig"):
        config = SimulationConfig(attack=attack, poison_rate=0.5, target=0)
        poisoned = poison_partition(data, config, spec, attacker_rank=0, client_id=3)
        changed = (poisoned.images != data.images).flatten(1).any(1)
        assert int(changed.sum()) == 50 and (poisoned.labels[changed] == 0).all()


def test_dba_attackers_hold_disjoint_parts_of_the_global_trigger(digits16):
    config = SimulationConfig(attack="dba", malicious=3, trigger_size=3)
    parts = [attacker_trigger(config, digits16.spec, rank) for rank in range(3)]
    full = global_trigger(config, digits16.spec)
    assert torch.equal(sum(p.mask for p in parts), full.mask)


def test_model_replacement_boost():
    g = {"w": torch.zeros(3), "n": torch.tensor(5)}
    l = {"w": torch.ones(3), "n": torch.tensor(6)}
    boosted = boost_update(g, l, 10.0)
    assert torch.equal(boosted["w"], torch.full((3,), 10.0)) and int(boosted["n"]) == 6


def test_too_few_nodes_stop_the_run_after_a_bounded_wait_with_what_to_set():
    import time

    import pytest

    from federated.strategies import MissingNodes, wait_for_nodes

    class TwoNodes:   # Flower's default simulation federation: 2 SuperNodes
        def get_node_ids(self):
            return [11, 12]

    started = time.monotonic()
    with pytest.raises(MissingNodes) as missing:
        wait_for_nodes(TwoNodes(), needed=10, wait_s=0.6, poll_s=0.1)
    assert 0.5 < time.monotonic() - started < 3
    assert "only 2 of the 10 nodes" in str(missing.value) and "--num-supernodes 10" in str(missing.value)
    wait_for_nodes(TwoNodes(), needed=2, wait_s=0.1)   # enough nodes: no wait


def test_the_server_stops_a_run_that_lacks_nodes_as_incomplete(tmp_path, digits16):

    import federated.apps as apps
    from federated.config import SimulationConfig
    from federated.run_folder import RunFolder

    class TwoNodes:
        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, timeout=None):
            raise AssertionError("no round may start without its nodes")

    config = SimulationConfig(clients=4, malicious=0, rounds=1, node_wait_s=0.2)
    run = RunFolder(tmp_path / "run", {"simulation": config.to_dict()}, config.model, digits16.spec, quiet=True)
    apps.serve(TwoNodes(), config, run)
    assert run.failure.startswith("only 2 of the 4 nodes") and not (tmp_path / "run" / "final.json").exists()
