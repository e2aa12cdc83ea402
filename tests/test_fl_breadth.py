"""FL breadth: the attack window and the backdoor's lifespan, Neurotoxin's projection, the patch
trigger's patterns, client sampling, and the in-training defences inside a real Flower run."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from defense.errors import ConfigError
from defense.experiment import Experiment
from defense.triggers import checkerboard, patch_pattern
from federated.attacks import neurotoxin_mask, projection
from federated.config import SimulationConfig
from federated.run_folder import backdoor_lifespan
from federated.simulate import main, parse_attack_rounds


def test_the_attack_window_limits_the_rounds_attackers_poison():
    assert parse_attack_rounds("all") == (1, 0) and parse_attack_rounds("from:4") == (4, 0)
    assert parse_attack_rounds("3:5") == (3, 5)
    config = SimulationConfig(malicious=2, rounds=10, attack_from_round=3, attack_until_round=5)
    attackers = config.malicious_clients()
    assert [bool(config.attackers_in_round(r)) for r in range(1, 11)] == [False, False, True, True, True] + [False] * 5
    assert set(config.attackers_in_round(4)) == set(attackers) and config.last_attack_round() == 5
    assert SimulationConfig(malicious=2, rounds=10).last_attack_round() == 10
    assert SimulationConfig(malicious=0).last_attack_round() == 0
    with pytest.raises(ConfigError, match="L >= K"):
        SimulationConfig(attack_from_round=5, attack_until_round=2)


def test_lifespan_counts_rounds_until_asr_falls_below_half_and_is_censored_otherwise():
    rows = [{"round": r, "asr_x1": a} for r, a in enumerate([0.1, 0.9, 0.95, 0.8, 0.6, 0.4, 0.2], start=1)]
    assert backdoor_lifespan(rows, last_attack_round=3) == {"lifespan_rounds": 3, "lifespan_censored": False}
    alive = [{"round": r, "asr_x1": 0.9} for r in range(1, 8)]
    assert backdoor_lifespan(alive, last_attack_round=3) == {"lifespan_rounds": 4, "lifespan_censored": True}
    never = [{"round": r, "asr_x1": 0.1} for r in range(1, 8)]     # no backdoor alive when the attack ended
    assert backdoor_lifespan(never, last_attack_round=3) == {"lifespan_rounds": None, "lifespan_censored": None}


def test_neurotoxin_keeps_the_attacker_off_the_coordinates_benign_training_moved_most():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():   # the last global update: large on the first layer's first row
        model[0].weight[0] += 5.0
        for p in model.parameters():
            p += 0.01 * torch.randn_like(p)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    allowed = neurotoxin_mask(global_state, previous, top_k=0.1)
    frozen = sum(int((~m).sum()) for m in allowed.values())
    total = sum(m.numel() for m in allowed.values())
    assert frozen == round(0.1 * total) and not allowed["0.weight"][0].any()
    assert neurotoxin_mask(global_state, None, 0.05) is None   # first round: nothing seen yet
    project = projection(global_state, allowed)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss = model(torch.randn(8, 10)).pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        project(model)
    after = model.state_dict()
    assert torch.equal(after["0.weight"][0], global_state["0.weight"][0])          # untouched
    assert not torch.equal(after["0.weight"][1:], global_state["0.weight"][1:])    # the rest moved


def test_neurotoxin_remembers_the_last_global_model_in_its_node_state():
    from flwr.app import Context, RecordDict

    from federated.apps import neurotoxin_step

    config = SimulationConfig(attacker="neurotoxin", neurotoxin_top_k=0.1)
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    first = {"w": torch.zeros(20)}
    assert neurotoxin_step(config, context, first, attacking=True) is None        # nothing to compare yet
    second = {"w": torch.arange(20, dtype=torch.float32)}
    project = neurotoxin_step(config, context, second, attacking=True)
    model = torch.nn.Module()
    model.register_buffer("w", torch.full((20,), -1.0))
    project(model)
    assert float(model.w[-1]) == 19.0 and float(model.w[-3]) == -1.0   # the top 10% (2 of 20) are pinned


def test_patch_patterns_and_the_record_that_names_them():
    board = checkerboard(3, 1)
    assert torch.equal(patch_pattern("tri1", 3, 1)[0], torch.tensor([[0., 1, 0], [1, 0, 1], [0, 1, 0]]))
    assert torch.equal(patch_pattern("checkerboard", 3, 1), board)
    assert torch.equal(patch_pattern("white", 3, 1), torch.ones(1, 3, 3))
    record = SimulationConfig(trigger_pattern="white").experiment()
    assert record.pattern == "white" and torch.equal(record.trigger(spec16()).pattern, torch.ones(1, 3, 3))
    old = {k: v for k, v in Experiment().to_dict().items() if k != "pattern"}   # files written before patterns
    assert Experiment.from_dict(old).pattern == "checkerboard"
    assert Experiment(attack="blended").pattern == "whole image"
    with pytest.raises(ConfigError, match="pattern"):
        SimulationConfig(trigger_pattern="stripes")


def spec16():
    from defense.spec import InputSpec

    return InputSpec(channels=1, height=16, width=16, num_classes=10, mean=(0.5,), std=(0.5,))


@pytest.mark.slow
def test_a_sampled_flame_run_with_an_attack_window_reports_sampling_exclusions_and_lifespan(tmp_path):
    out = tmp_path / "run"
    assert main(["--clients", "6", "--sample", "3", "--malicious", "2", "--rounds", "3", "--local-epochs", "1",
                 "--attack-rounds", "1:1", "--aggregation", "flame", "--no-purify", "--quiet", "--out", str(out)]) == 0
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert all(r["clients_sampled"] == 3 and r["clients_trained"] == 3 for r in rows)
    assert all(r["updates_excluded"] is not None and 0 <= r["malicious_excluded"] <= r["updates_excluded"] for r in rows)
    assert all(r["malicious_clients"] == 0 for r in rows[1:])            # no attack after round 1
    last = rows[-1]
    assert "lifespan_rounds" in last and "lifespan_censored" in last
    assert "Backdoor lifespan" in (out / "summary.md").read_text()
    assert json.loads((out / "status.json").read_text())["state"] == "complete"


def test_a3fl_optimises_the_patch_against_the_global_model_and_repeats_itself():
    from defense.data import Split, load_dataset
    from defense.scenario import backdoored_scenario
    from defense.triggers import make_trigger
    from federated.attacks import a3fl_trigger

    torch.manual_seed(0)
    bundle = load_dataset("digits", None, 16)
    model = backdoored_scenario("badnets", 16, 3, 0.0, target=0, seed=0, epochs=3, cache=None).teacher  # clean
    base = make_trigger("badnets", bundle.spec)
    images, labels = bundle.train.images[:200], bundle.train.labels[:200]
    data = Split(images, labels)

    def loss_to_target(trigger):   # a 3x3 patch cannot flip a clean model; it can move it
        with torch.no_grad():
            logits = model.eval()(trigger.paste(images[labels != 0]))
            return float(torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)))

    found = a3fl_trigger(model, data, base, target=0, steps=40, adversary_steps=1, step_size=0.05, seed=3)
    again = a3fl_trigger(model, data, base, target=0, steps=40, adversary_steps=1, step_size=0.05, seed=3)
    assert torch.equal(found.pattern, again.pattern)                   # every attacker computes the same one
    assert found.pattern.min() >= 0 and found.pattern.max() <= 1 and found.position == base.position
    assert not torch.equal(found.pattern, base.pattern)
    assert loss_to_target(found) < loss_to_target(base) - 0.2             # it moves a clean model towards the target
    record = Experiment(patch_values=tuple(found.pattern.flatten().tolist()))
    assert torch.allclose(record.trigger(bundle.spec).pattern, found.pattern)


@pytest.mark.parametrize("values, message", [((2.0,) * 9, r"\[0, 1\]"), ((0.5,) * 8, "patch values"),
                                             (("x",) * 9, "patch_values expects")])
def test_a_model_files_patch_values_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.from_dict({**Experiment().to_dict(), "patch_values": list(values)})
    with pytest.raises(ConfigError, match="patch attacks"):
        Experiment(attack="sig", patch_values=(0.5,) * 9)
    with pytest.raises(ConfigError, match="a3fl"):
        SimulationConfig(attacker="a3fl", attack="blended")


@pytest.mark.slow
def test_an_a3fl_run_measures_asr_with_the_latest_trigger_and_records_it(tmp_path):
    from defense.modelio import load_model
    from defense.scenario import model_file_scenario

    out = tmp_path / "run"
    assert main(["--clients", "4", "--malicious", "1", "--rounds", "2", "--local-epochs", "1", "--attacker", "a3fl",
                 "--a3fl-steps", "5", "--no-purify", "--quiet", "--out", str(out)]) == 0
    record = load_model(out / "final.json").manifest["experiment"]
    assert len(record["patch_values"]) == 9 and record["patch_values"] != checkerboard(3, 1).flatten().tolist()
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    # the run's last ASR was measured with the recorded trigger: the file's own record reproduces it
    scenario = model_file_scenario(out / "final.json")
    assert abs(scenario.evaluate(scenario.teacher)["asr_x1"] - rows[-1]["asr_x1"]) < 1e-6
