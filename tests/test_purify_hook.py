"""The purification hook inside a live Flower simulation: it must never wait for ever for CPUs that
Flower's client actors hold, and it hands back purified models with a before/after report."""
import pytest
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

# the hook's mechanics, not the verdict: the default recipe without its verdict, at a tiny size
TINY_DHBE = ["epochs=1", "iters_per_epoch=2", "batch_size=16", "perturbations.warmup_steps=5", "verdict=off",
             "perturbations.refresh_steps=3"]


@pytest.mark.slow
def test_in_run_and_final_purification_complete_without_hanging(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "federated.simulate", "--clients", "4", "--malicious", "1", "--rounds", "2",
               "--local-epochs", "1", "--purify-every", "1", "--quiet", "--out", str(out),
               "--purify-set", *TINY_DHBE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=420,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "models" / "purified-round-001.json").exists()   # in-run, inside Flower's Ray
    assert (out / "purified.json").exists()                         # final, after the simulation
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    last = pq.read_table(out / "metrics.parquet").to_pylist()[-1]
    assert last["purified_acc"] is not None and last["purify_wall_s"] > 0
    from defense.modelio import load_model

    # the final purification changed the weights it was given
    assert load_model(out / "purified.json").weights_sha256 != load_model(out / "final.json").weights_sha256
    summary = (out / "summary.md").read_text()
    assert "purified (DHBE" in summary and (out / "purification.png").exists()


@pytest.mark.slow
def test_a_plain_flower_quickstart_app_with_the_hook_gets_its_model_scanned_and_purified():
    """examples/hook_quickstart.py, a Flower app written as a user would (its own network registered
    with MODELS, its own ClientApp sending ordinary replies, its own ServerApp with FedAvg, one client
    planting a 2x2 patch), with PurifyingStrategy around FedAvg: the final global model comes back
    scanned, and when flagged, erased (the app's own patch then succeeds less often); nothing is left
    in a temporary folder."""
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("hook_quickstart", Path(__file__).parents[1] / "examples" / "hook_quickstart.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    before = set(Path(tempfile.gettempdir()).glob("purified-*"))
    outcome = app.run(clients=3, rounds=3)
    assert set(Path(tempfile.gettempdir()).glob("purified-*")) == before
    [record] = outcome["purifications"]
    assert record["round"] == 3 and record["model"] is None
    scan = record["evidence"]["scan"]
    assert "backdoored" in scan and "threshold" in scan
    if scan["backdoored"]:
        assert app.TARGET in scan["suspects"]
        assert app.attack_success(outcome["arrays"]) < 0.5, "flagged, but the app's patch still works"


def test_the_hook_refuses_an_unknown_network_and_a_schedule_that_purifies_nothing():
    import pytest
    from flwr.serverapp.strategy import FedAvg

    from defense.errors import ConfigError
    from defense.spec import InputSpec
    from federated.purification import PurifyingStrategy

    spec = InputSpec(channels=1, height=8, width=8, num_classes=10, mean=(0.3,), std=(0.3,))
    with pytest.raises(ConfigError, match="unknown model 'my-net'"):
        PurifyingStrategy(FedAvg(), model_name="my-net", spec=spec, final_round=3)
    with pytest.raises(ConfigError, match="purifies nothing"):
        PurifyingStrategy(FedAvg(), model_name="small-cnn", spec=spec)
