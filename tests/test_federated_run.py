"""A tiny run through the real Flower simulation engine (Ray backend)."""
import pytest
import json
import math

import pyarrow.parquet as pq

from defense.modelio import load_model
from federated.run_folder import ROUND_COLUMNS
from federated.simulate import main


@pytest.mark.slow
def test_tiny_federated_run_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    code = main(["--clients", "4", "--malicious", "1", "--rounds", "2", "--local-epochs", "1",
                 "--no-purify", "--quiet", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    config = json.loads((out / "config.json").read_text())
    assert config["simulation"]["clients"] == 4 and config["simulation"]["malicious"] == 1
    table = pq.read_table(out / "metrics.parquet")
    assert table.column_names == ROUND_COLUMNS
    rows = table.to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_trained"] == 4 and row["client_failures"] == 0  # every client, every round
        assert row["malicious_clients"] == 1
        assert all(math.isfinite(row[k]) for k in ("acc", "asr_x1", "asr_x4", "asr_x9", "wall_time_s"))
    assert load_model(out / "final.json").model_name == "small-cnn"
    assert (out / "models" / "round-002.json").exists() and (out / "metrics.png").stat().st_size > 1000
    assert "metrics.png" in (out / "summary.md").read_text()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_model_files_carry_their_experiment_and_evaluate_measures_against_it(tmp_path, capsys):
    """A run with a non-default attack, target and seed: `defense.evaluate` with no attack flags
    measures the global model with the run's own trigger (the same ASR the run reported); a flag
    overrides its field of the record."""
    from defense.evaluate import main as evaluate

    out = tmp_path / "run"
    assert main(["--clients", "4", "--malicious", "2", "--rounds", "2", "--local-epochs", "1", "--attack", "blended",
                 "--target", "7", "--seed", "4242", "--no-purify", "--quiet", "--out", str(out)]) == 0
    record = load_model(out / "final.json").manifest["experiment"]
    assert (record["attack"], record["target"], record["trigger_seed"], record["written_by"]) == \
        ("blended", 7, 4242, "federated.simulate")
    assert load_model(out / "models" / "round-001.json").manifest["experiment"] == record
    last = pq.read_table(out / "metrics.parquet").to_pylist()[-1]
    capsys.readouterr()
    assert evaluate([str(out / "final.json")]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["experiment_from"] == "the file's record" and measured["overridden"] == []
    assert measured["asr_x1"] == last["asr_x1"] and measured["acc"] == last["acc"]
    assert evaluate([str(out / "final.json"), "--target", "3"]) == 0   # the flag wins over the record
    other = json.loads(capsys.readouterr().out)
    assert other["overridden"] == ["target"] and other["target"] == 3 and other["attack"] == "blended"
    assert other["asr_x1"] < measured["asr_x1"] - 0.5


@pytest.mark.slow
def test_the_front_door_plants_a_backdoor_and_its_purification_erases_most_of_it(tmp_path):
    """End to end through `federated.simulate`: two of four clients poison, FedAvg carries the
    backdoor into the global model, and the server-side DHBE job (a short CPU recipe) lowers its ASR."""
    out = tmp_path / "run"
    assert main(["--clients", "4", "--malicious", "2", "--rounds", "6", "--local-epochs", "2", "--quiet",
                 "--out", str(out), "--purify-recipe", "cpu", "--purify-set", "epochs=4", "iters_per_epoch=10",
                 "perturbations.warmup_steps=100"]) == 0
    last = pq.read_table(out / "metrics.parquet").to_pylist()[-1]
    print({k: last[k] for k in ("acc", "asr_x1", "asr_x9", "purified_acc", "purified_asr_x1", "purified_asr_x9")})
    assert last["asr_x9"] >= 0.9 and last["asr_x1"] >= 0.6        # the attack planted its backdoor
    assert last["purified_asr_x1"] <= last["asr_x1"] - 0.5         # the purification erased most of it
    assert last["purified_asr_x9"] <= last["asr_x9"] - 0.5
    assert load_model(out / "purified.json").manifest["experiment"]["attack"] == "badnets"
