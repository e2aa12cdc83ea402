"""Faults in a federated run: failing clients, determinism, interrupted runs."""
import pytest
import json

import pyarrow.parquet as pq

from federated.simulate import main

TINY = ["--clients", "4", "--malicious", "1", "--rounds", "2", "--local-epochs", "1", "--no-purify", "--quiet"]


def _metrics(out):
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


@pytest.mark.slow
def test_failing_clients_do_not_stop_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["--clients", "10", "--malicious", "2", "--rounds", "2", "--local-epochs", "1", "--no-purify",
                 "--quiet", "--client-failure-rate", "0.3", "--out", str(out)]) == 0
    rows = _metrics(out)
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert sum(r["client_failures"] for r in rows) >= 2
    for row in rows:
        assert row["clients_trained"] + row["client_failures"] == 10


@pytest.mark.slow
def test_the_same_seed_gives_identical_metrics(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--seed", "3", "--out", str(first)]) == 0
    assert main([*TINY, "--seed", "3", "--out", str(second)]) == 0
    assert _metrics(first) == _metrics(second)
    assert (first / "final.safetensors").read_bytes() == (second / "final.safetensors").read_bytes()


def test_an_interrupted_run_says_it_is_incomplete(tmp_path, digits16):
    import pytest

    import federated.engine as engine
    from federated.config import SimulationConfig

    def interrupted(config, run, wrap_strategy=None, verbose=False):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run_federated(SimulationConfig(), tmp_path / "run", digits16.spec, purify=False,
                             rounds_runner=interrupted)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "incomplete" and "KeyboardInterrupt" in status["reason"]
    assert not list((tmp_path / "run").rglob("*.tmp")) and not (tmp_path / "run" / "final.json").exists()


def test_an_unwritable_output_folder_is_a_one_line_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "federated.simulate", "--out", str(blocker / "run")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "is a file, not a folder" in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def always_failing_clients(config):
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        raise RuntimeError("this client always fails")

    return app


@pytest.mark.slow
def test_a_run_in_which_every_round_fails_ends_clearly_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    import federated.apps as apps

    monkeypatch.setattr(apps, "make_client_app", always_failing_clients)
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 1
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "incomplete" and "no round aggregated any client update" in status["reason"]
    assert "8 client failures" in status["reason"]
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("python -m federated.simulate: error: the run is incomplete")
    assert not (out / "final.json").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_killed_simulation_keeps_every_finished_round_intact(tmp_path):
    """SIGKILL to a running `federated.simulate` (its whole process group, Ray included): every round
    saved before the kill loads and verifies, metrics.parquet reads, and nothing is half-written."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from defense.modelio import load_model

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "federated.simulate", "--clients", "4", "--malicious", "1",
                                "--rounds", "40", "--local-epochs", "1", "--no-purify", "--quiet", "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = out / "status.json"
            if status.exists() and json.loads(status.read_text()).get("rounds_done", 0) >= 2:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    done = json.loads((out / "status.json").read_text())["rounds_done"]
    assert 2 <= done < 40
    rounds = sorted((out / "models").glob("round-*.json"))
    assert len(rounds) >= done
    for manifest in rounds[:done]:
        load_model(manifest)                      # whole and matching its SHA-256
    assert len(pq.read_table(out / "metrics.parquet").to_pylist()) >= done
    json.loads((out / "status.json").read_text())   # whole (a write cut by the kill leaves only a hidden .tmp)
    assert not (out / "final.json").exists()
