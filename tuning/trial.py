"""One Ray Tune trial of a DHBE ablation: plant or load the teacher, then run deploy's DHBE job body
with Tune's reporting. The score ASHA stops by is data-free (a defender has no test ASR)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

SCORE = "defender_score"


def trial(params: dict[str, Any]) -> None:
    """One Tune trial: build the teacher, then run deploy's DHBE job body with Tune's reporting."""
    import torch
    from ray import tune

    from defense.dhbe import Recipe
    from defense.modelio import LoadedModel, load_model
    from defense.scenario import backdoored_scenario
    from deploy.ray_job import job_loop_config, run_dhbe_loop

    setup = params["setup"]
    swept = {k: v for k, v in params.items() if k != "setup"}
    with open(Path(setup["out"]) / "trial_starts.log", "a") as log:
        log.write(json.dumps(swept, sort_keys=True) + "\n")
    if "trigger_size" in params:  # the patch-size preset plants one teacher per trigger size
        scenario = backdoored_scenario(setup["attack"] or "badnets", setup["image_size"], int(params["trigger_size"]),
                                       target=setup["target"] or 0, seed=setup["seed"], cache=Path(setup["cache"]))
        teacher = LoadedModel(scenario.teacher, "small-cnn", scenario.bundle.spec, {}, "planted")
        evaluator = scenario.evaluate
    else:
        teacher = load_model(setup["model"])
        evaluator = evaluation_scenario(setup, setup["trigger_size"]).evaluate
    base = Recipe.from_dict(setup["base"])
    dhbe_fields = {k: v for k, v in params.items() if k not in ("setup", "trigger_size")}
    if "student_lr" in dhbe_fields and setup.get("scale_generator_lrs", True):
        ratio = dhbe_fields["student_lr"] / base.dhbe.student_lr
        dhbe_fields["generator_lr"] = base.dhbe.generator_lr * ratio
        dhbe_fields["trigger_lr"] = base.dhbe.trigger_lr * ratio
    recipe = base.replace(**dhbe_fields)

    def report(metrics: dict, checkpoint=None) -> None:
        metrics[SCORE] = metrics["synthetic_agreement"] - metrics["trigger_flip_rate"]
        tune.report(metrics, checkpoint=checkpoint)

    context = tune.get_context()
    loop = job_loop_config(teacher, recipe, threads=1, storage=Path(setup["out"]), name=context.get_trial_id())
    run_dhbe_loop(loop, report=report, get_checkpoint=tune.get_checkpoint, checkpoint_type=tune.Checkpoint,
                  evaluator=evaluator, device=torch.device("cpu"))


def evaluation_scenario(setup: dict, trigger_size: Optional[int]):
    """The experimenter's view of a loaded model file (its ACC/ASR): its experiment record, the sweep's
    flags over it, its data set. The sweep builds it once before any trial: a bad record fails there."""
    from defense.scenario import model_file_scenario

    overrides = {"attack": setup["attack"], "trigger_size": trigger_size, "target": setup["target"],
                 "dataset": setup["dataset"], "blend_alpha": setup.get("blend_alpha"), "place": setup.get("place"),
                 "pattern": setup.get("pattern")}
    return model_file_scenario(setup["model"], overrides, setup["data_dir"])
