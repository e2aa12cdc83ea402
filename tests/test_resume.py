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
    for path in list(folder.glob("final.*")) + [p for p in (folder / "models").glob("round-[0-9]*")
                                                  if int(p.stem.split("-")[1]) > rounds_kept]:
        path.unlink()
    (folder / "status.json").write_text(json.dumps({"state": "running", "rounds_done": rounds_kept}))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted run of ARGS."""
    folder = tmp_path_factory.mktemp("resume") / "whole"
    assert main(ARGS + ["--out", str(folder)]) == 0
    return folder


@pytest.mark.slow
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, whole):
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    interrupt_after(resumed, 1)
    (resumed / "models" / "round-abc.json").write_text("{}")   # a name no round has: left alone, no traceback
    assert main(["--resume", str(resumed), "--no-purify", "--quiet"]) == 0
    assert (resumed / "models" / "round-abc.json").read_text() == "{}"   # resume deletes only what it wrote
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


@pytest.mark.slow
def test_resume_refuses_a_crafted_folder_and_touches_nothing_outside_it(tmp_path, whole):
    """A round model of another network or spec, or with another experiment record, is refused before
    anything is written; `models` as a link to a folder elsewhere is refused and the files there stay."""
    from dataclasses import replace

    from defense.modelio import load_model, save_model
    from defense.models import build_model

    def crafted(name):
        folder = tmp_path / name
        shutil.copytree(whole, folder)
        interrupt_after(folder, 2)
        return folder

    other = crafted("other-spec")                         # (a) a 7-class round model in a 10-class run
    first = load_model(other / "models" / "round-001.json")
    seven = replace(first.spec, num_classes=7)
    save_model(build_model(first.model_name, seven), other / "models" / "round-001", first.model_name, seven,
               {"tool": "federated.simulate", "round": 1}, experiment=first.manifest["experiment"])
    before = {p.name: p.read_bytes() for p in (other / "models").iterdir()}
    with pytest.raises(ConfigError, match="num_classes"):
        main(["--resume", str(other), "--no-purify", "--quiet"])
    assert {p.name: p.read_bytes() for p in (other / "models").iterdir()} == before
    assert json.loads((other / "status.json").read_text())["state"] == "running"

    record = crafted("other-record")                      # (b) a round model that says sig / target 5
    manifest = json.loads((record / "models" / "round-002.json").read_text())
    manifest["experiment"].update(attack="sig", target=5, written_by="attacker")
    (record / "models" / "round-002.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="experiment record differs.*attack"):
        main(["--resume", str(record), "--no-purify", "--quiet"])
    assert not (record / "final.json").exists()

    linked = crafted("linked")                            # (c) models/ a link to a folder outside the run
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(whole / "models", elsewhere)
    shutil.rmtree(linked / "models")
    (linked / "models").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError, match="link"):
        main(["--resume", str(linked), "--no-purify", "--quiet"])
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(p.name for p in (whole / "models").iterdir())
    one_file = crafted("linked-file")                     # a round file that is a link
    target = tmp_path / "outside.json"
    target.write_text("{}")
    (one_file / "models" / "round-003.json").symlink_to(target)
    with pytest.raises(ConfigError, match="link"):
        main(["--resume", str(one_file), "--no-purify", "--quiet"])
    assert target.read_text() == "{}"
