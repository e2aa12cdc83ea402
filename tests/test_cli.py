"""Bad command-line input: exit code 2, one line on stderr naming the problem, no traceback, nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    (["federated.simulate", "--malicious", "11"], "--malicious"),
    (["federated.simulate", "--clients", "-3"], "--clients"),
    (["federated.simulate", "--dataset", "imagenet"], "--dataset"),
    (["federated.simulate", "--aggregation", "bulyan", "--malicious", "3"], "bulyan"),
    (["federated.simulate", "--dataset", "mnist", "--data-dir", "/nonexistent"], "train-images"),
    (["federated.simulate", "--attack-rounds", "from:x"], "--attack-rounds"),
    (["federated.simulate", "--poison-rate", "1.5"], "--poison-rate"),
    (["federated.simulate", "--target", "12"], "--target"),
    (["federated.simulate", "--purify-set", "epochs"], "--purify-set expects FIELD=VALUE"),
    (["defense.evaluate", "/nonexistent/model.json"], "does not exist"),
    (["defense.evaluate", "x.json", "--trigger-size", "0"], "--trigger-size"),
    (["deploy.purify", "/nonexistent/model.json", "--out", "OUT"], "does not exist"),
    (["deploy.purify", "m.json"], "--out"),
    (["deploy.purify", "m.json", "--out", "o", "--workers", "0"], "--workers"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, needle):
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_flags_are_typed_and_bad_ones_named():
    from defense.errors import ConfigError
    from deploy.purify import coerce_fields

    assert coerce_fields({"lam": "0.5", "epochs": "7", "patch_replaces": "yes", "lr_milestones": "0.5,0.7",
                          "lam_after": "0.3"}) == {"lam": 0.5, "epochs": 7, "patch_replaces": True,
                                                   "lr_milestones": (0.5, 0.7), "lam_after": 0.3}
    assert coerce_fields({"lam_after": "none"}) == {"lam_after": None}
    with pytest.raises(ConfigError, match="lam_after expects a number"):
        coerce_fields({"lam_after": "abc"})
    with pytest.raises(ConfigError, match="unknown DHBE field 'lamb'"):
        coerce_fields({"lamb": "1"})


def test_recipes_are_chosen_by_name_and_overridden_by_set():
    from deploy.purify import build_parser, dhbe_config_from_args

    args = build_parser().parse_args(["m.json", "--out", "o", "--recipe", "federated", "--set", "seed=3"])
    config = dhbe_config_from_args(args)
    assert (config.bn_prior_layers, config.epochs, config.lam_after, config.seed) == (1, 15, 0.7, 3)
    cpu = dhbe_config_from_args(build_parser().parse_args(["m.json", "--out", "o"]))
    assert (cpu.bn_prior_layers, cpu.epochs, cpu.lam_after) == (0, 30, None)
