"""`federated.simulate --resume`: an interrupted run goes on from its last saved round and ends where
the uninterrupted run ends (bit for bit: clients are seeded per round, aggregation is in client-id
order); folders that are complete or not run folders are refused with one line."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from defense.errors import ConfigError
from federated.run_folder import ROUND_COLUMNS, write_parquet
from federated.simulate import main

ARGS = ["--clients", "4", "--malicious", "1", "--rounds", "3", "--local-epochs", "1", "--no-purify", "--quiet"]


def interrupt_after(folder, rounds_kept: int) -> None:
    """What a kill during round rounds_kept + 1 leaves: the earlier rounds' files, status running."""
    rows = pq.read_table(folder / "metrics.parquet").to_pylist()
    write_parquet(folder / "metrics.parquet", rows[:rounds_kept], ROUND_COLUMNS)
    for path in list(folder.glob("final.*")) + [p for p in (folder / "models").iterdir()
                                                  if int(p.stem.split("-")[1]) > rounds_kept]:
        path.unlink()
    (folder / "status.json").write_text(json.dumps({"state": "running", "rounds_done": rounds_kept}))


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(ARGS + ["--out", str(whole)]) == 0
    shutil.copytree(whole, resumed)
    interrupt_after(resumed, 1)
    (resumed / "models" / "round-abc.json").write_text("{}")   # a name no round has: dropped, no traceback
    assert main(["--resume", str(resumed), "--no-purify", "--quiet"]) == 0
    assert not (resumed / "models" / "round-abc.json").exists()
    assert json.loads((resumed / "status.json").read_text())["state"] == "complete"
    sha = lambda folder: json.loads((folder / "final.json").read_text())["weights_sha256"]
    assert sha(resumed) == sha(whole)
    a, b = (pq.read_table(f / "metrics.parquet").to_pylist() for f in (whole, resumed))
    assert [r["round"] for r in b] == [1, 2, 3]
    assert [(r["acc"], r["asr_x1"], r["malicious_clients"]) for r in a] == \
        [(r["acc"], r["asr_x1"], r["malicious_clients"]) for r in b]
    with pytest.raises(ConfigError, match="nothing to resume"):
        main(["--resume", str(resumed), "--no-purify", "--quiet"])
    hostile = tmp_path / "hostile"            # the last saved model's experiment record is read: checked
    shutil.copytree(whole, hostile)
    interrupt_after(hostile, 1)
    manifest = json.loads((hostile / "models" / "round-001.json").read_text())
    manifest["experiment"]["patch_values"] = [7.0] * 9
    (hostile / "models" / "round-001.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        main(["--resume", str(hostile), "--no-purify", "--quiet"])


def test_resume_refuses_what_is_not_an_interrupted_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        main(["--resume", str(tmp_path), "--no-purify"])
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        main(["--resume", str(tmp_path), "--no-purify"])
    (tmp_path / "config.json").write_text(json.dumps({"simulation": {"clients": "many"}}))
    with pytest.raises(ConfigError, match="clients"):
        main(["--resume", str(tmp_path), "--no-purify"])
    with pytest.raises(ConfigError, match="drop --out"):
        main(["--resume", str(tmp_path), "--out", str(tmp_path / "x")])
