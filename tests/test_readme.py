from pathlib import Path

ROOT = Path(__file__).parents[1]


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("```")[0].strip() for b in blocks]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = _setup_commands()
    assert main_cmd.endswith("python -m federated.simulate --malicious 2")
    assert test_cmd.endswith("python -m pytest -q tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
