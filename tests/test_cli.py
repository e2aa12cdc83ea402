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
    (["federated.simulate", "--purify-set", "lamb=1"], "unknown DHBE field 'lamb'"),
    (["federated.simulate", "--purify-set", "perturbations.bank_size=0"], "perturbations.bank_size"),
    (["deploy.purify", "m.json", "--out", "o", "--set", "nope.x=1"], "unknown DHBE extension 'nope'"),
    (["defense.evaluate", "/nonexistent/model.json"], "does not exist"),
    (["defense.evaluate", "x.json", "--trigger-size", "0"], "--trigger-size"),
    (["deploy.purify", "/nonexistent/model.json", "--out", "OUT"], "does not exist"),
    (["deploy.purify", "m.json"], "--out"),
    (["deploy.purify", "m.json", "--out", "o", "--workers", "0"], "--workers"),
    (["deploy.purify", "m.json", "--out", "o", "--workers", "10000"], "--workers"),
    (["deploy.purify", "m.json", "--out", "o", "--set", "batch_size=1000000000"], "batch_size must be in 1..65536"),
    (["deploy.purify", "m.json", "--out", "o", "--set", "student_lr=inf"], "student_lr expects a float"),
    (["deploy.purify", "m.json", "--out", "o", "--set", "seed=-1"], "seed must be in"),
    (["deploy.purify", "m.json", "--out", "/proc/purified"], "system folder"),
    (["deploy.purify", "m.json", "--out", "o", "--budget", "inf"], "--budget"),
    (["federated.simulate", "--seed", "-1"], "--seed"),
    (["federated.simulate", "--rounds", "10000000"], "--rounds must be at most"),
    (["federated.simulate", "--out", "/proc/run"], "system folder"),
    (["federated.simulate", "--client-weighting", "reported"], "--client-weighting"),
    (["tuning.sweep", "--preset", "patch-size", "--out", "/proc/sweep"], "system folder"),
    (["tuning.sweep", "--preset", "patch-size", "--samples", "100000"], "--samples"),
    (["federated.simulate", "--sample", "20"], "--sample must be in 0..10"),
    (["federated.simulate", "--sample", "1"], "--sample must be >= 2"),
    (["federated.simulate", "--attack-rounds", "5:2"], "--attack-rounds"),
    (["federated.simulate", "--aggregation", "rlr", "--rlr-threshold", "50"], "--rlr-threshold"),
    (["federated.simulate", "--aggregation", "foolish"], "--aggregation"),
    (["federated.simulate", "--attacker", "a4fl"], "--attacker"),
    (["federated.simulate", "--neurotoxin-top-k", "2"], "--neurotoxin-top-k"),
    (["federated.simulate", "--flame-noise", "-1"], "--flame-noise"),
    (["federated.simulate", "--dp-noise", "nan"], "dp_noise expects a float"),
    (["federated.simulate", "--trigger-pattern", "stripes"], "--trigger-pattern"),
    (["federated.simulate", "--resume", "/nonexistent/run"], "not a run folder"),
    (["deploy.purify", "m.json", "--out", "o", "--set", "precision=fp16"], "precision must be one of"),
    (["deploy.purify", "m.json", "--out", "o", "--name", ".."], "a job name is"),      # would name the output's parent
    (["deploy.purify", "m.json", "--out", "o", "--resume", "never-ran"], "no checkpoints of that job"),
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


@pytest.mark.parametrize("argv", [["federated.simulate", "--out", "{file}"],
                                  ["federated.simulate", "--out", "{file}/run"],
                                  ["deploy.purify", "m.json", "--out", "{file}/purified"],
                                  ["deploy.purify", "m.json", "--out", "{folder}"],
                                  ["tuning.sweep", "--preset", "patch-size", "--out", "{file}"]])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, argv):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    argv = [a.format(file=tmp_path / "a-file", folder=tmp_path / "a-folder") for a in argv]
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "folder" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert list((tmp_path / "a-folder").iterdir()) == []


def test_config_flags_are_typed_and_bad_ones_named():
    from dataclasses import dataclass
    from typing import Optional

    from defense.errors import ConfigError
    from defense.fields import coerce_fields

    @dataclass
    class Example:
        lam: float = 0.1
        epochs: int = 1
        replaces: bool = False
        milestones: tuple[float, ...] = ()
        after: Optional[float] = None

    assert coerce_fields(Example, {"lam": "0.5", "epochs": "7", "replaces": "yes", "milestones": "0.5,0.7",
                                   "after": "0.3"}) == {"lam": 0.5, "epochs": 7, "replaces": True,
                                                        "milestones": (0.5, 0.7), "after": 0.3}
    assert coerce_fields(Example, {"after": "none"}) == {"after": None}
    for bad, message in [({"after": "abc"}, "after expects a float"), ({"lamb": "1"}, "unknown Example field 'lamb'"),
                         ({"epochs": "1.5"}, "epochs expects a int"), ({"replaces": "maybe"}, "replaces expects"),
                         ({"lam": "inf"}, "lam expects a float"), ({"epochs": True}, "epochs expects")]:
        with pytest.raises(ConfigError, match=message):
            coerce_fields(Example, bad)


def test_recipes_are_chosen_by_name_and_overridden_by_set(tmp_path):
    import json

    from defense.dhbe import recipe_config
    from defense.dhbe.cli import recipe_from_args
    from defense.errors import ConfigError
    from deploy.purify import build_parser

    args = build_parser().parse_args(["m.json", "--out", "o", "--recipe", "federated", "--set", "seed=3"])
    recipe = recipe_from_args(args)
    assert (recipe.get("bn_prior").layers, recipe.dhbe.epochs, recipe.get("lambda_step").after,
            recipe.dhbe.seed) == (1, 15, 0.7, 3)
    default = recipe_from_args(build_parser().parse_args(["m.json", "--out", "o"]))
    assert default.extension_names[:2] == ["verdict", "perturbations"] and default.dhbe.epochs == 20
    cpu = recipe_from_args(build_parser().parse_args(["m.json", "--out", "o", "--recipe", "cpu"]))
    assert (cpu.get("bn_prior").layers, cpu.dhbe.epochs, "lambda_step" in cpu) == (0, 30, False)
    whole = tmp_path / "recipe.json"
    whole.write_text(json.dumps(recipe_config("default").to_dict()))
    assert recipe_from_args(build_parser().parse_args(["m.json", "--out", "o", "--config", str(whole)])) == \
        recipe_config("default")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"lam": 0.3, "student_ema.decay": 0.99}))
    loaded = recipe_from_args(build_parser().parse_args(["m.json", "--out", "o", "--config", str(partial)]))
    assert loaded.dhbe.lam == 0.3 and loaded.get("student_ema").decay == 0.99
    partial.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON list, not an object"):
        recipe_from_args(build_parser().parse_args(["m.json", "--out", "o", "--config", str(partial)]))


def test_json_lines_never_carry_nan_or_infinity():
    import json

    from defense.cli import json_line

    line = json_line({"agreement": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5})
    assert json.loads(line) == {"agreement": None, "rows": [1.0, None], "ok": 0.5} and "NaN" not in line


@pytest.mark.parametrize("module", ["federated.simulate", "deploy.purify", "tuning.sweep", "defense.scan", "defense.evaluate"])
def test_every_flag_has_help_and_says_its_default_once(module):
    """--help of every CLI: help on every flag, "(default: ...)" at most once per flag and never a
    Python repr of a tuple or None, and a usage line naming the command as it is run."""
    import importlib

    parser = importlib.import_module(module if module != "defense.scan" else "defense.scan.__main__").build_parser()
    formatter = parser._get_formatter()
    assert parser.format_usage().startswith(f"usage: python -m {module}")
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{module} {action.option_strings[0]} has no help"
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("(default") <= 1, (module, action.option_strings[0], text)
        assert "(default: None)" not in text and "(default: (" not in text, (module, action.option_strings[0], text)
