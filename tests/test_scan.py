"""The scanner (defense/scan): a stage of its own, before the game. It names a backdoor's target from
the model alone, data-free; earlier versions are scanned on the same samples and reported, but the
verdict is the model's own; the game only reads its report.
Its CLI answers one line (or one JSON line), exit 0 for either verdict, 2 with one line on bad input."""
import json
from dataclasses import replace
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from defense.dhbe import DHBETrainer, recipe_config, smoke_sized
from defense.errors import ConfigError
from defense.modelio import save_model
from defense.models import build_model
from defense.scan import ScanConfig, SuspectTrigger, VersionScores, decide, scan
from defense.scan.versions import earlier_rounds, run_folder_versions
from defense.spec import InputSpec
from federated.purification import GlobalModelHistory

ROOT = Path(__file__).parents[1]
SPEC = InputSpec(1, 16, 16, 10, (0.5,), (0.5,))


def version(scores: list[float], concentration: float = 1.0) -> VersionScores:
    return VersionScores(tuple(0.01 for _ in scores), tuple(concentration for _ in scores), tuple(scores))


def test_the_verdict_is_the_models_own_and_the_earlier_versions_are_evidence():
    flat = version([0.0] * 4)
    names = ["round 5", "round 10", "model"]
    config = ScanConfig(threshold=0.85)
    found = decide([version([0.0, 2.0, 0.0, 0.0]), flat, version([0.0, 1.5, 0.0, 0.9], 0.2)], names, [0.0] * 4, config)
    assert found.backdoored and found.suspects == (1, 3) and found.class_scores == (0.0, 1.5, 0.0, 0.9)
    assert "in 2 of 3 versions (round 5, model)" in found.evidence[0] and "20% of it in one window" in found.evidence[1]
    assert "over it in 2 of 3 versions" in found.summary() and "also suspected: 3" in found.summary()
    faded = decide([version([0.0, 2.0, 0.0, 0.0]), flat], ["round 5", "model"], [0.0] * 4, config)
    assert not faded.backdoored and "no backdoor found" in faded.summary()   # earlier versions do not decide


def test_the_scan_names_the_target_of_a_patch_backdoor_and_clears_a_clean_model(badnets_scenario, clean_scenario):
    """(The central blended fixture, tests/conftest.py, is a miss of the scanner: its target scores
    0.6-0.7 under the 0.85 threshold; docs/scan.md lists such misses.)"""
    spec = clean_scenario.bundle.spec
    report = scan(badnets_scenario.teacher, spec)
    assert report.backdoored and report.suspects[0] == badnets_scenario.target, report.summary()
    assert report.score > report.threshold and report.seconds > 0 and report.evidence
    trigger = report.triggers[0]   # what the game is handed: the suspect's trigger, working on the model
    assert trigger.target == report.suspects[0] and len(report.triggers) == len(report.suspects)
    stamped = (1 - trigger.mask) * report.samples[0] + trigger.mask * trigger.pattern
    with torch.no_grad():
        sent = (badnets_scenario.teacher.eval()(stamped).argmax(1) == trigger.target).float().mean()
    assert sent >= 0.8 and float(trigger.mask.mean()) < 0.2
    assert not {"triggers", "samples"} & set(report.to_dict()) and json.dumps(report.to_dict())
    clean = scan(clean_scenario.teacher, spec)
    assert not clean.backdoored and clean.suspects == () and clean.score <= clean.threshold, clean.summary()


def test_earlier_versions_are_scanned_on_the_same_samples_and_reported(badnets_scenario, clean_scenario):
    spec = clean_scenario.bundle.spec
    alone = scan(clean_scenario.teacher, spec)
    report = scan(clean_scenario.teacher, spec, [badnets_scenario.teacher])
    assert report.versions == ("earlier 1", "model") and len(report.per_version) == 2
    assert report.per_version[-1] == alone.per_version[-1]          # the model's own measurement is unchanged
    assert report.per_version[0].score[badnets_scenario.target] > report.threshold   # the backdoored version shows
    assert not report.backdoored and "over it in" not in report.summary()   # the verdict is the model's own


def test_classes_inverted_in_groups_give_the_same_masks_as_all_at_once(badnets_scenario):
    """Memory is bounded by the images per forward pass, not by the number of classes."""
    from defense.scan.inversion import ScanSamples, fit_sample_generator, invert_masks

    spec, model = badnets_scenario.bundle.spec, badnets_scenario.teacher.eval()
    torch.manual_seed(0)
    pool = ScanSamples.draw(fit_sample_generator(model, spec, 20, 32, 64, 16, 1e-3, 1e-4), spec, 2, 8)
    together = invert_masks(model, pool, 10, 40, 0.1, 1e-3, 0.9)
    grouped = invert_masks(model, pool, 10, 40, 0.1, 1e-3, 0.9, max_images=24)   # groups of 3 classes
    assert (together.areas < 1).sum() >= 3
    assert torch.allclose(together.areas, grouped.areas, atol=1e-5)
    assert torch.allclose(together.concentrations, grouped.concentrations, atol=1e-4)


def test_the_scan_leaves_the_callers_random_stream_alone(clean_scenario):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    scan(clean_scenario.teacher, clean_scenario.bundle.spec, config=ScanConfig().smoke_sized())
    assert torch.equal(torch.rand(3), expected)


def test_an_earlier_version_of_another_network_is_refused():
    with pytest.raises(ConfigError, match="earlier version 1 is another network"):
        scan(build_model("small-cnn", SPEC), SPEC, [build_model("small-cnn", InputSpec(1, 16, 16, 7, (0.5,), (0.5,)))],
             ScanConfig().smoke_sized())


@pytest.mark.parametrize("field,value", [("threshold", 0), ("mask_lr", 0), ("mask_cost", 11), ("mask_steps", 10**9),
                                         ("pool_batches", 0), ("mask_success", 1.5), ("generator_lr", float("nan"))])
def test_scan_settings_are_validated(field, value):
    with pytest.raises(ConfigError):
        ScanConfig.from_values({field: value})


def test_the_game_reads_the_scan_and_never_rederives_it(badnets_scenario, clean_scenario):
    spec = clean_scenario.bundle.spec
    recipe = smoke_sized(recipe_config("default"))
    with pytest.raises(ConfigError, match="scan"):
        DHBETrainer(clean_scenario.teacher, spec, recipe)          # the verdict needs the scan's report
    clean = decide([version([0.0] * 10)], ["model"], [0.0] * 10, recipe.scan)
    stopped = DHBETrainer(clean_scenario.teacher, spec, recipe, scan=clean)
    stopped.run_epoch()
    assert stopped.stop_reason.startswith("no backdoor found") and stopped.output_model() is stopped.teacher
    assert len(stopped.extension("perturbations").sources[0].bank) == 0   # no warm-up after the verdict
    suspect = decide([version([0.0, 0.0, 0.0, 9.0] + [0.0] * 6)], ["model"], [0.0] * 10, recipe.scan)
    trigger = SuspectTrigger(3, torch.full((1, *spec.shape[1:]), 0.1), torch.rand(spec.shape))
    suspect = replace(suspect, triggers=(trigger,), samples=torch.rand(2, 4, *spec.shape))
    game = DHBETrainer(badnets_scenario.teacher, spec, recipe, scan=suspect)
    game.run_epoch()
    triggers = game.extension("perturbations").sources[1]
    assert game.stop_reason is None and triggers.targets == [3]
    assert torch.equal(triggers.bank.rows[0][0], trigger.mask)      # the scan's trigger, as found
    assert game.evidence()["scan"]["suspects"] == [3] and game.evidence()["verdict"]["suspected_targets"] == [3]


def test_a_recipe_carries_its_scan_settings():
    recipe = recipe_config("default", {"scan.threshold": "1.5", "scan.mask_steps": 200})
    assert recipe.scan.threshold == 1.5 and recipe.scan.mask_steps == 200
    assert recipe_config("official").scan is None and "scan" not in recipe_config("official").to_dict()
    with pytest.raises(ConfigError, match="verdict reads the scan"):
        recipe_config("default", {"scan": "off"})
    with pytest.raises(ConfigError, match="unknown scan field"):
        recipe_config("default", {"scan.nope": 1})


def test_the_server_picks_the_quarter_rounds_and_keeps_a_bounded_history():
    assert earlier_rounds(20, range(1, 21)) == [5, 10, 15]
    assert earlier_rounds(2, [1]) == [1] and earlier_rounds(1, []) == []
    assert earlier_rounds(20, range(16, 20)) == [16, 17, 19]     # the rounds since an in-run purification
    history = GlobalModelHistory(keep=4)
    for number in range(1, 41):
        history.add(number, ArrayRecord({"w": torch.full((2,), float(number))}))
    assert len(history.models) <= 4 and sorted(history.models) == [16, 32]
    picked = history.earlier(40)
    assert [float(a.to_torch_state_dict()["w"][0]) for a in picked] == [16.0, 32.0]
    history.clear()
    assert history.models == {} and history.stride == 1


# --- the CLI ----------------------------------------------------------------------------------------------
def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "defense.scan", *map(str, args), "--set", "generator_steps=3",
                           "pool_batches=2", "batch_size=4", "mask_steps=2"],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_cli_prints_one_verdict_line_or_one_json_line_and_writes_nothing_unless_asked(tmp_path):
    for name in ("model", "early"):
        save_model(build_model("small-cnn", SPEC), tmp_path / name, "small-cnn", SPEC, {"tool": "test"})
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run_cli("model.json", "--earlier", "early.json", cwd=tmp_path)
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 1, done.stderr
    assert done.stdout.startswith(("backdoor suspected", "no backdoor found"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    record = json.loads(run_cli("model.json", "--json", cwd=tmp_path).stdout)
    for key in ("backdoored", "suspects", "class_scores", "per_version", "weight_scores", "threshold",
                "evidence", "seconds", "summary"):
        assert key in record
    assert run_cli("model.json", "--out", "report.json", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "model.json"


@pytest.mark.parametrize("case", ["other network", "other spec", "not a model", "run with a model", "nothing"])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, case):
    save_model(build_model("small-cnn", SPEC), tmp_path / "model", "small-cnn", SPEC, {"tool": "test"})
    shifted = InputSpec(1, 16, 16, 10, (0.4,), (0.5,))
    save_model(build_model("small-cnn", shifted), tmp_path / "shifted", "small-cnn", shifted, {"tool": "test"})
    (tmp_path / "junk.json").write_text("{not json")
    args = {"other network": ["model.json", "--earlier", "junk.json"],
            "other spec": ["model.json", "--earlier", "shifted.json"],
            "not a model": ["junk.json"], "run with a model": ["model.json", "--run", "."], "nothing": []}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run_cli(*args, "--out", "report.json", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "other spec":
        assert "mean" in done.stderr          # the error says how the two specs differ


def test_a_run_folder_gives_the_final_model_and_the_quarter_rounds_and_a_crafted_one_is_refused(tmp_path):
    run = tmp_path / "run"
    for number in range(1, 9):
        save_model(build_model("small-cnn", SPEC), run / "models" / f"round-{number:03d}", "small-cnn", SPEC, {"t": 1})
    save_model(build_model("small-cnn", SPEC), run / "final", "small-cnn", SPEC, {"t": 1})
    final, earlier = run_folder_versions(run)
    assert final == run / "final.json" and [p.name for p in earlier] == ["round-002.json", "round-004.json", "round-006.json"]
    assert run_cli("--run", run, cwd=tmp_path).returncode == 0
    outside = tmp_path / "outside"
    (run / "models").rename(outside)
    (run / "models").symlink_to(outside)                    # models/ a link to a folder elsewhere
    done = run_cli("--run", run, cwd=tmp_path)
    assert done.returncode == 2 and "not a plain folder" in done.stderr and "Traceback" not in done.stderr
    (run / "models").unlink()
    (run / "models").mkdir()
    (run / "models" / "round-001.json").symlink_to(run / "final.json")   # a round file that is a link
    assert "not a plain file" in run_cli("--run", run, cwd=tmp_path).stderr
    assert "no final.json" in run_cli("--run", tmp_path, cwd=tmp_path).stderr


def test_deploy_refuses_an_earlier_version_of_another_network_in_one_line(tmp_path):
    other = InputSpec(1, 16, 16, 7, (0.5,), (0.5,))
    save_model(build_model("small-cnn", SPEC), tmp_path / "model", "small-cnn", SPEC, {"tool": "test"})
    save_model(build_model("small-cnn", other), tmp_path / "other", "small-cnn", other, {"tool": "test"})
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run([sys.executable, "-m", "deploy.purify", "model.json", "--out", "out",
                           "--earlier", "other.json"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "earlier version" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_run_report_says_what_the_scan_found():
    from federated.run_folder import evidence_line

    line = evidence_line({"scan": {"summary": "backdoor suspected: class 1, local patch, score 6.0 over threshold 3"},
                          "verdict": {"final_synthetic_agreement": 0.9}})
    assert line.startswith("scan: backdoor suspected: class 1") and "90%" in line
    assert "erased" in line
    stopped = evidence_line({"scan": {"summary": "no backdoor found"}, "stopped": "no backdoor found: ...; handed back"})
    assert stopped.startswith("scan: no backdoor found")
    guarded = evidence_line({"scan": {"summary": "backdoor suspected: class 1"}, "verdict": {
        "final_synthetic_agreement": 0.56, "min_agreement": 0.7, "guard": "guard: ...; handed back the input model"}})
    assert "erased" not in guarded and guarded.endswith("handed back the input model")
