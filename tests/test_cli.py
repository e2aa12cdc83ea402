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
