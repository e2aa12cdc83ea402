"""The verdict over earlier versions of a model (a federated server's earlier global models): a
backdoor that stood out while the attack ran is named even when the last model no longer shows it,
and one version alone does not make a suspect (docs/dhbe.md, twelfth round)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from defense.dhbe import DHBETrainer, recipe_config
from defense.dhbe.extensions.verdict import voted_suspects
from defense.modelio import save_model
from defense.models import build_model
from defense.spec import InputSpec
from federated.purification import GlobalModelHistory, earlier_rounds

# the verdict's probe at half its real size, the game itself one short epoch
PROBE_ONLY = {"epochs": 1, "iters_per_epoch": 1, "batch_size": 64, "trigger_bank.warmup_steps": 2,
              "mask_search.steps": 2, "blend_search.steps": 50, "blend_search.warmup_steps": 150}


def test_a_class_is_a_suspect_only_where_enough_versions_agree():
    flat = [0.0] * 4
    target_twice = [[0.0, 3.0, 0.0, 0.0], [0.0, 2.5, 0.0, 0.0], flat, [0.0, 0.0, 0.0, 2.1]]
    assert voted_suspects(target_twice, 2.0, 2) == [1]          # class 3 stood out once: no
    assert voted_suspects(target_twice, 2.0, 1) == [1, 3]
    assert voted_suspects([[0.0, 2.1, 0.0, 0.0]], 2.0, 2) == [1]  # one version: it alone decides
    assert voted_suspects([flat, [0.0, 2.1, 0.0, 0.0]], 2.0, 2) == []   # two versions: both must


def test_a_backdoor_that_left_the_last_model_is_found_in_the_earlier_ones(blended_scenario, clean_scenario):
    """The model purified is clean-looking (here: a clean model, which the verdict alone hands back:
    tests/test_dhbe.py); two earlier versions carry a blended backdoor towards class 0: the verdict
    names class 0 and the game runs."""
    spec = clean_scenario.bundle.spec
    recipe = recipe_config("default", PROBE_ONLY)
    backdoored = blended_scenario.teacher
    trainer = DHBETrainer(clean_scenario.teacher, spec, recipe, earlier=[backdoored, backdoored])
    trainer.run_epoch()
    verdict = trainer.evidence()["verdict"]
    assert trainer.stop_reason is None and verdict["suspected_targets"] == [blended_scenario.target]
    assert len(verdict["earlier_anomaly_index"]) == 2
    assert all(index[blended_scenario.target] > 2 for index in verdict["earlier_anomaly_index"])
    search = trainer.extension("blend_search")
    assert search.classes == [blended_scenario.target] and len(search.bank) == 1
    assert [t.target for t in trainer.extension("mask_search").found] == [blended_scenario.target]
    # one earlier version against the model's own: two versions, and they disagree: no suspect
    once = DHBETrainer(clean_scenario.teacher, spec, recipe, earlier=[backdoored])
    once.run_epoch()
    assert once.stop_reason is not None and once.evidence()["verdict"]["suspected_targets"] == []


def test_earlier_versions_do_not_change_the_games_random_stream(clean_scenario, blended_scenario):
    spec = clean_scenario.bundle.spec
    recipe = recipe_config("default", {**PROBE_ONLY, "blend_search.suspect_threshold": 0.5,
                                       "blend_search.steps": 3, "blend_search.warmup_steps": 2})
    plain = DHBETrainer(blended_scenario.teacher, spec, recipe)
    plain.extension("blend_search").probe(plain)
    after_plain = torch.rand(3)
    weighed = DHBETrainer(blended_scenario.teacher, spec, recipe, earlier=[clean_scenario.teacher])
    weighed.extension("blend_search").probe(weighed)
    assert torch.equal(torch.rand(3), after_plain)


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


def test_an_earlier_version_of_another_network_is_one_line_and_exit_2(tmp_path):
    spec = InputSpec(1, 16, 16, 10, (0.5,), (0.5,))
    other = InputSpec(1, 16, 16, 7, (0.5,), (0.5,))
    save_model(build_model("small-cnn", spec), tmp_path / "model", "small-cnn", spec, {"tool": "test"})
    save_model(build_model("small-cnn", other), tmp_path / "other", "small-cnn", other, {"tool": "test"})
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run([sys.executable, "-m", "deploy.purify", "model.json", "--out", "out",
                           "--earlier", "other.json"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "earlier version" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_run_report_says_what_the_earlier_global_models_showed():
    from federated.run_folder import evidence_line

    line = evidence_line({"verdict": {"suspected_targets": [1], "anomaly_index": [0.0, 1.5],
                                      "earlier_anomaly_index": [[0.0, 3.0], [0.1, 2.5]],
                                      "final_synthetic_agreement": 0.9}})
    assert "target class [1]" in line and "earlier global models: 3.00, 2.50" in line
