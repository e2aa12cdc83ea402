"""`batchnorm_refit`: the handed-back model's batch-norm statistics re-estimated on clean synthetic
samples (docs/dhbe.md, fifteenth round)."""
import pytest
import torch

from defense.dhbe import DHBETrainer, recipe_config
from defense.errors import ConfigError
from defense.metrics import evaluate_backdoor


def refit_recipe(**overrides):
    return recipe_config("cpu-blend", {"student_ema": "off", "batchnorm_refit": "on", "blend_search.steps": 2,
                                       "blend_search.suspect_threshold": 0.0, **overrides})


def norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_statistics_polluted_by_perturbed_inputs_are_refitted_and_the_accuracy_comes_back(clean_scenario):
    bundle = clean_scenario.bundle
    acc = lambda model: evaluate_backdoor(model.eval(), bundle.test, clean_scenario.trigger, 0)["acc"]
    trainer = DHBETrainer(clean_scenario.teacher, bundle.spec, refit_recipe())
    trainer.extension("blend_search").probe(trainer)          # fits the search's copy of G to T's priors
    student = trainer.student
    student.train()
    with torch.no_grad():                                     # S's statistics from perturbed inputs only
        for _ in range(30):
            student(torch.rand(128, *bundle.spec.shape) * 3)
    polluted = acc(student)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    handed_back = trainer.output_model()
    assert polluted < acc(clean_scenario.teacher) - 0.3       # the pollution costs accuracy ...
    assert acc(handed_back) > acc(clean_scenario.teacher) - 0.05   # ... and the refit gives it back
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.items())   # S itself untouched
    refit = handed_back.state_dict()
    buffers = {name for name, _ in handed_back.named_buffers()}
    assert all(torch.equal(refit[k], v) for k, v in weights.items() if k not in buffers)   # same weights
    assert not torch.equal(norms(handed_back)[0].running_mean, norms(student)[0].running_mean)
    again = trainer.output_model().state_dict()                # the same samples each time: deterministic
    assert all(torch.equal(again[k], v) for k, v in refit.items())


def test_the_teacher_handed_back_by_the_verdict_is_never_refitted(clean_scenario):
    recipe = recipe_config("default", {"epochs": 2, "iters_per_epoch": 1, "batch_size": 16, "batchnorm_refit": "on",
                                       "trigger_bank.warmup_steps": 2, "blend_search.steps": 2,
                                       "blend_search.warmup_steps": 2, "mask_search.steps": 2,
                                       "blend_search.suspect_threshold": 50.0})
    trainer = DHBETrainer(clean_scenario.teacher, clean_scenario.bundle.spec, recipe)
    trainer.run_epoch()
    trainer.run_epoch()
    assert trainer.stop_reason is not None and trainer.output_model() is trainer.teacher


@pytest.mark.parametrize("value", [0, 1001])
def test_batchnorm_refit_config_is_validated(value):
    with pytest.raises(ConfigError, match="batchnorm_refit.batches"):
        recipe_config("default", {"batchnorm_refit": "on", "batchnorm_refit.batches": value})


def test_batchnorm_refit_needs_the_blend_search():
    with pytest.raises(ConfigError, match="blend_search"):
        recipe_config("cpu", {"batchnorm_refit": "on"})
