"""A tiny run through the real Flower simulation engine (Ray backend)."""
import json
import math

import pyarrow.parquet as pq

from defense.modelio import load_model
from federated.run_folder import ROUND_COLUMNS
from federated.simulate import main


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
