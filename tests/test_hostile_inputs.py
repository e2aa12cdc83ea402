"""Hostile inputs, second round (issue 39): every finding played as the attacker played it, each
answered by a one-line error, a logged rejection or a status the next command can read. The
aggregation, FoolsGold, resume, sweep and CIFAR findings have their tests beside their code
(test_validation, test_defences, test_resume, test_tuning, test_data); docs/reliability.md lists all."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defense.cli import run_main, writable_destination
from defense.errors import ConfigError, one_line
from defense.experiment import Experiment

ROOT = Path(__file__).parents[1]


def one_line_error(command: list[str], cwd: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", *command], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.returncode, lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, digits16):
    from defense.modelio import save_model
    from defense.models import build_model

    folder = tmp_path_factory.mktemp("model")
    return save_model(build_model("small-cnn", digits16.spec), folder / "model", "small-cnn", digits16.spec, {"tool": "test"})


def test_a_deep_config_a_long_out_and_a_vast_key_are_one_line_errors(tmp_path, model_file):
    """(7) a --config JSON nested 10^5 deep; (9) a 300-character --out name for deploy.purify and
    federated.simulate; (12) a 100 KB key in --set: each one line, exit 2, nothing written, and the
    hostile value named, not echoed."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, line = one_line_error(["deploy.purify", str(model_file), "--config", str(deep), "--out", "x"], tmp_path)
    assert code == 2 and "nested too deeply" in line
    long_name = "a" * 300
    code, line = one_line_error(["deploy.purify", str(model_file), "--out", long_name], tmp_path)
    assert code == 2 and "longer than" in line
    code, line = one_line_error(["federated.simulate", "--out", long_name, "--no-purify"], tmp_path)
    assert code == 2 and "longer than" in line
    code, line = one_line_error(["deploy.purify", str(model_file), "--out", "x", "--set", "k" * 100_000 + "=1"], tmp_path)
    assert code == 2 and "unknown" in line and len(line) < 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.json"]


def test_dev_shm_is_a_place_to_write_but_dev_is_not(tmp_path):
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        assert writable_destination("/dev/shm/purify-test/out.json") == Path("/dev/shm/purify-test/out.json")
    with pytest.raises(ConfigError, match="system folder"):
        writable_destination("/dev/out.json")


def test_an_os_error_of_the_machine_is_one_line_and_exit_1(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/models/round-002.safetensors")

    with pytest.raises(SystemExit) as exited:
        run_main(full, "python -m federated.simulate", [])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "round-002" in err


def _round_row(number: int) -> dict:
    return {"round": number, "acc": 0.5, "asr_x1": 0.1, "wall_time_s": 1.0}


def _run(tmp_path, digits16, runner):
    from federated.config import SimulationConfig
    from federated.engine import run_federated

    config = SimulationConfig(clients=2, malicious=0, rounds=3, local_epochs=1)
    return run_federated(config, tmp_path / "run", digits16.spec, purify=False, quiet=True, rounds_runner=runner)


def test_a_run_folder_removed_during_the_run_stops_and_is_not_recreated(tmp_path, digits16):
    """(11) The folder deleted after round 1: the next write stops the run with one line (an OSError,
    exit 1 through run_main); the folder is not silently recreated and the run never says complete."""
    from defense.models import build_model
    from federated.run_folder import RunFolderLost

    def runner(config, run, **_):
        model = build_model(config.model, digits16.spec)
        run.record_round(_round_row(1), model)
        shutil.rmtree(run.root)
        run.record_round(_round_row(2), model)

    with pytest.raises(RunFolderLost, match="removed during the run"):
        _run(tmp_path, digits16, runner)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_stops_the_run_with_a_status_the_next_command_reads(tmp_path, digits16, monkeypatch):
    """(10) The disk fills while round 2's model is written: the run stops with the OSError, the
    status says incomplete with 1 round done (round 2 never counted without its model: --resume goes
    on from round 1), no half-written file is left; a disk full before the run folder exists leaves no
    half-made folder."""
    import federated.run_folder as run_folder
    from defense.models import build_model

    real_save = run_folder.save_model

    def save_until_full(model, path, *args, **kwargs):
        if Path(path).name == "round-002":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(run_folder, "save_model", save_until_full)

    def runner(config, run, **_):
        model = build_model(config.model, digits16.spec)
        run.record_round(_round_row(1), model)
        run.record_round(_round_row(2), model)

    with pytest.raises(OSError, match="No space left"):
        _run(tmp_path, digits16, runner)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "incomplete" and status["rounds_done"] == 1 and "No space" in status["reason"]
    assert not list((tmp_path / "run").rglob("*.tmp"))

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_folder, "atomic_write_json", no_space)
    with pytest.raises(OSError, match="No space left"):
        run_folder.RunFolder(tmp_path / "fresh", {"simulation": {}}, "small-cnn", digits16.spec, quiet=True)
    assert not (tmp_path / "fresh").exists()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True)
                    | st.text(max_size=300), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=20), inner, max_size=4), max_leaves=12)
EDGE_VALUES = [10**30, -10**19, 2**63, 2**31, -1, 0, 1, 3, 9, 0.5, 1e-300, 1e300, "", "x" * 100_000]
EDGES = st.sampled_from(EDGE_VALUES)


@st.composite
def records(draw):
    """A valid record (attack, place, pattern drawn from their names) with one to three fields
    replaced by an edge value or any JSON, and now and then an unknown field: a mutated record
    reaches the code behind the first check, where a wholly random one would not."""
    from defense.triggers import ATTACKS, PATTERNS, PLACES

    record = {"dataset": "digits", "image_size": 16, "attack": draw(st.sampled_from(ATTACKS.names())),
              "place": draw(st.sampled_from(PLACES)), "pattern": draw(st.sampled_from(PATTERNS)),
              "trigger_size": draw(st.integers(1, 5)), "target": draw(st.integers(0, 9))}
    for name in draw(st.lists(st.sampled_from(sorted(Experiment.__dataclass_fields__)), min_size=1, max_size=3,
                              unique=True)):
        record[name] = draw(EDGES | JSON | st.lists(st.floats(-1, 2), min_size=9, max_size=9))
    if draw(st.integers(0, 9)) == 0:
        record[draw(st.sampled_from(["junk", "k" * 5000]))] = draw(JSON)
    return record


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records())
def test_a_fuzzed_experiment_record_is_accepted_or_one_short_config_error(record, digits16):
    """Any JSON object as a model file's experiment record: accepted (and its trigger built for the
    model's spec) or refused with a ConfigError whose line is short."""
    try:
        experiment = Experiment.from_dict(record)
        if experiment.dataset == "digits" and experiment.target < digits16.spec.num_classes:
            experiment.trigger(digits16.spec)
    except ConfigError as exc:
        assert len(one_line(exc)) <= 700 and str(exc)


def test_every_record_field_at_every_edge_for_every_attack_is_accepted_or_one_config_error(digits16):
    """The exhaustive side of the fuzz: each field of a valid record of each attack and place set to each
    edge value. (4) trigger_seed 10^30 (blended) or -10^19 (random place) ended in an OverflowError
    traceback when the trigger was built."""
    from defense.triggers import ATTACKS, PLACES

    for attack in ATTACKS.names():
        for place in PLACES:
            for name in sorted(Experiment.__dataclass_fields__):
                for value in EDGE_VALUES:
                    record = {"attack": attack, "place": place, name: value}
                    try:
                        experiment = Experiment.from_dict(record)
                        if experiment.dataset == "digits" and experiment.target < digits16.spec.num_classes:
                            experiment.trigger(digits16.spec)
                    except ConfigError as exc:
                        assert len(one_line(exc)) <= 700, record


def _override_keys() -> list[str]:
    from dataclasses import fields

    from defense.dhbe.config import EXTENSIONS, DHBEConfig
    from defense.scan import ScanConfig

    keys = [f.name for f in fields(DHBEConfig)] + ["scan"] + [f"scan.{f.name}" for f in fields(ScanConfig)]
    for name in EXTENSIONS.names():
        keys += [name] + [f"{name}.{f.name}" for f in fields(EXTENSIONS.get(name)) if f.name != "name"]
    return keys + ["junk", "perturbations.junk", "x" * 3000]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(st.sampled_from(_override_keys()), JSON | st.sampled_from(["on", "off", "1e9", "-1", "nan"]),
                       max_size=5))
def test_fuzzed_recipe_overrides_are_accepted_or_one_short_config_error(overrides, digits16):
    """Any FIELD=VALUE overrides (strings or JSON values, as --set and --config give them) on the
    default recipe: a validated recipe, or one short ConfigError; never another exception."""
    from defense.dhbe.recipes import recipe_config

    try:
        recipe = recipe_config("default", overrides)
        recipe.validate_for(digits16.spec)
    except ConfigError as exc:
        assert len(one_line(exc)) <= 700 and str(exc)
