"""Faults in a federated run: failing clients, determinism, interrupted runs."""
import json

import pyarrow.parquet as pq

from federated.simulate import main

TINY = ["--clients", "4", "--malicious", "1", "--rounds", "2", "--local-epochs", "1", "--no-purify", "--quiet"]


def _metrics(out):
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def test_failing_clients_do_not_stop_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["--clients", "10", "--malicious", "2", "--rounds", "2", "--local-epochs", "1", "--no-purify",
                 "--quiet", "--inject-client-failures", "0.3", "--out", str(out)]) == 0
    rows = _metrics(out)
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert sum(r["client_failures"] for r in rows) >= 2
    for row in rows:
        assert row["clients_trained"] + row["client_failures"] == 10
        assert 0.0 <= row["acc"] <= 1.0


def test_the_same_seed_gives_identical_metrics(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--seed", "3", "--out", str(first)]) == 0
    assert main([*TINY, "--seed", "3", "--out", str(second)]) == 0
    assert _metrics(first) == _metrics(second)
    assert (first / "final.safetensors").read_bytes() == (second / "final.safetensors").read_bytes()
