"""`flwr run .`: the same apps on Flower's own runner (a managed local SuperLink in simulation mode)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from defense.errors import ConfigError
from federated.flwr_app import config_from_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_run_config_maps_onto_the_simulation_config():
    config = config_from_run_config({"clients": 6, "malicious": 1, "local-epochs": 3, "poison-rate": 0.25,
                                     "data-dir": "", "aggregation": "median", "out": "", "purify": False})
    assert (config.clients, config.malicious, config.local_epochs, config.poison_rate) == (6, 1, 3, 0.25)
    assert config.data_dir is None and config.aggregation == "median"
    with pytest.raises(ConfigError, match="unknown run-config keys.*'colients'"):
        config_from_run_config({"colients": 4})
    with pytest.raises(ConfigError, match="--malicious must be in 0..4"):
        config_from_run_config({"clients": 4, "malicious": 5})


def test_the_run_config_declares_every_simulation_field_with_the_clis_defaults():
    """Flower refuses a --run-config key the app does not declare: [tool.flwr.app.config] holds every
    SimulationConfig field (kebab-case) with its default, which is the CLI's, and the run's own keys;
    `purify` is on, as on the CLI."""
    import tomllib
    from dataclasses import fields

    from federated.config import SimulationConfig
    from federated.flwr_app import RUN_KEYS
    from federated.simulate import build_parser, config_from_args

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    names = {f.name.replace("_", "-"): f.name for f in fields(SimulationConfig)}
    assert set(declared) == set(names) | set(RUN_KEYS)
    assert config_from_run_config(declared) == config_from_args(build_parser().parse_args([])) == SimulationConfig()
    assert declared["purify"] is True and not build_parser().parse_args([]).no_purify
    assert declared["purify-every"] == build_parser().parse_args([]).purify_every


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flwr") is None, reason="the flwr CLI is not on PATH")
def test_flwr_run_trains_the_same_apps_into_a_run_folder(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 4\noptions.backend.client-resources.num-cpus = 1\n"
        "options.backend.init-args.num-cpus = 2\n")
    http_port, control_port = _free_port(), _free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           # the app's dependencies are this environment's; never let Flower re-resolve torch
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "run"
    try:
        done = subprocess.run(["flwr", "run", str(ROOT), "--stream", "--run-config",
                               f"clients=4 malicious=1 rounds=2 local-epochs=1 purify=false out='{out}'"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    finally:  # the managed SuperLink is detached: stop it whatever happened
        subprocess.run(["pkill", "-f", f"flower-superlink.*--port {http_port}"], check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["state"] == "complete", done.stdout[-2000:]
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 4 and r["malicious_clients"] == 1 for r in rows)
    assert json.loads((out / "config.json").read_text())["simulation"]["clients"] == 4
    assert (out / "final.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's deployment CLIs are not on PATH")
def test_the_same_apps_run_on_the_deployment_engine(tmp_path):
    """Stretch of the federated issue: a SuperLink and two SuperNodes on loopback, one round."""
    # Flower 1.41's SuperLink serves its Control, Fleet and Runtime APIs on one HTTP port
    ports = {name: _free_port() for name in ("http", "node0", "node1")}
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{ports["http"]}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = [["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                 "--port", str(ports["http"]), "--database", str(tmp_path / "state.db")]]
    commands += [["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{ports['http']}",
                  "--port", str(ports[f"node{i}"]), "--node-config", f"partition-id={i} num-partitions=2"]
                 for i in range(2)]
    processes = []
    out = tmp_path / "run"
    try:
        for i, command in enumerate(commands):
            processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=(logs / f"{i}.log").open("w"),
                                              stderr=subprocess.STDOUT))
            if i == 0:
                _wait_for_port(ports["http"])
        done = subprocess.run(["flwr", "run", str(ROOT), "loopback", "--stream", "--run-config",
                               f"clients=2 malicious=1 rounds=1 local-epochs=1 purify=false out='{out}'"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    log_tail = "".join((logs / f"{i}.log").read_text()[-1500:] for i in range(len(commands)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log_tail
    assert json.loads((out / "status.json").read_text())["state"] == "complete", done.stdout[-2000:] + log_tail
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1] and rows[0]["clients_trained"] == 2 and rows[0]["malicious_clients"] == 1
