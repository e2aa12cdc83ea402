"""Run a script against another commit of this repository, side by side with this tree in one run:
the commit is checked out into a temporary git worktree (removed afterwards) and the script runs there
in a subprocess; its last stdout line is JSON. Used by `--compare REF` in scan_speed and default_time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def run_at_commit(ref: str, script: str, args: Sequence[str]) -> dict:
    """`python -c script args...` in a worktree of `ref`; its last stdout line, parsed as JSON."""
    with tempfile.TemporaryDirectory(prefix="compare-ref-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), ref], check=True)
        try:
            done = subprocess.run([sys.executable, "-c", script, *args], cwd=tree, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)})
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ref}: the script failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
