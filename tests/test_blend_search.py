"""The data-free blend-pattern search (defense/blend_search.py) and its use in DHBE."""
import pytest
import torch
from torch import nn

from defense.blend_search import ClassPatterns, invert_class_patterns
from defense.dhbe import DHBETrainer, cpu_blend_recipe, cpu_recipe, purify, recipe_config
from defense.errors import ConfigError
from defense.generators import blend_patterns
from defense.models import build_model
from defense.scan import VersionScores, decide
from defense.spec import InputSpec

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


def test_anomaly_index_flags_the_class_with_an_unusually_easy_pattern():
    found = ClassPatterns(list(range(6)), torch.zeros(6, 1, 4, 4), [0.005, 0.3, 0.2, 0.5, 0.25, 0.4])
    index = found.anomaly_index()
    assert index[0] > 2 > max(index[1:])
    assert found.suspects(2.0) == [0]
    assert ClassPatterns(list(range(4)), torch.zeros(4, 1, 4, 4), [0.3, 0.31, 0.29, 0.3]).suspects(2.0) == []


class ShortcutModel(nn.Module):
    """Linear on pixels: class 0 also reads one fixed pixel pattern very strongly (a blend shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 4)
        self.shortcut = torch.randn(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = self.linear(flat)
        return logits + torch.stack([20 * (flat - 0.5) @ self.shortcut] + [torch.zeros(len(x))] * 3, dim=1)


def test_inversion_finds_the_shortcut_class_and_leaves_the_model_as_it_was():
    model = ShortcutModel().train()
    found = invert_class_patterns(model, lambda: 0.4 + 0.2 * torch.rand(32, 1, 4, 4), [0, 1, 2, 3], ratio=0.1, steps=60, lr=0.1)
    assert found.patterns.shape == (4, 1, 4, 4) and found.patterns.abs().max() <= 1
    assert found.losses[0] < 0.1 * min(found.losses[1:])
    assert found.suspects(2.0) == [0]
    assert model.training and all(p.requires_grad for p in model.parameters())
    # the found pattern is the shortcut's direction: bright where it reads positive
    assert torch.corrcoef(torch.stack([found.patterns[0].flatten(), model.shortcut]))[0, 1] > 0.5


def tiny_config(**blend):
    return recipe_config("cpu", {"epochs": 2, "iters_per_epoch": 1, "batch_size": 16, "trigger_bank.warmup_steps": 2,
                                 "student_ema": "off", "blend_search.steps": 3, "blend_search.warmup_steps": 2,
                                 **{f"blend_search.{k}": v for k, v in blend.items()}})


def test_dhbe_keeps_the_inverted_patterns_in_a_bank_refreshed_on_the_student():
    teacher = build_model("small-cnn", SPEC).eval()
    trainer = DHBETrainer(teacher, SPEC, tiny_config(every=1, suspect_threshold=0.0))
    search = trainer.extension("blend_search")
    trainer.run_epoch()
    assert search.classes == list(range(10)) and search.bank.shape == (10, 1, 16, 16)
    assert len(search.found.losses) == 10
    state = trainer.state_dict()
    trainer.run_epoch()  # epoch 1 % 1 == 0: the kept classes' patterns re-found against S
    assert search.bank.shape == (20, 1, 16, 16)
    assert not torch.equal(search.bank[10:], search.bank[:10])
    resumed = DHBETrainer(teacher, SPEC, tiny_config(every=1, suspect_threshold=0.0))
    resumed.load_state_dict(state)
    restored = resumed.extension("blend_search")
    assert torch.equal(restored.bank, state["extensions"]["blend_search"]["bank"]) and restored.classes == list(range(10))


def test_the_blend_term_enters_the_student_loss_only_with_patterns():
    teacher = build_model("small-cnn", SPEC).eval()
    trainer = DHBETrainer(teacher, SPEC, tiny_config(suspect_threshold=50.0))
    trainer.run_epoch()
    search = trainer.extension("blend_search")
    assert search.classes == [] and len(search.bank) == 0   # nothing suspicious: no term
    x = torch.rand(4, *SPEC.shape)
    assert search.student_terms(trainer, x, trainer.teacher(x), trainer.student(x)) is None


def test_with_no_suspect_and_no_hand_back_the_game_runs_blind_on_every_class():
    teacher = build_model("small-cnn", SPEC).eval()
    recipe = recipe_config("default", {"epochs": 2, "iters_per_epoch": 1, "batch_size": 16,
                                       "trigger_bank.warmup_steps": 2, "blend_search.steps": 3,
                                       "blend_search.warmup_steps": 2, "mask_search.steps": 2,
                                       "verdict.hand_back_clean": False})
    nothing = decide([VersionScores(*[(0.0,) * 10] * 3)], ["model"], [0.0] * 10, recipe.scan)   # the scan: no suspect
    trainer = DHBETrainer(teacher, SPEC, recipe, scan=nothing)
    trainer.run_epoch()
    search, masks = trainer.extension("blend_search"), trainer.extension("mask_search")
    assert search.suspects == [] and search.classes == list(range(10)) and len(search.bank) == 10
    assert masks.found == []                          # the targeted search aims at suspects only
    assert trainer.stop_reason is None                # no suspect, and the game still runs (no hand-back)
    x = torch.rand(4, *SPEC.shape)
    assert search.student_terms(trainer, x, trainer.teacher(x), trainer.student(x)) is not None
    trainer.run_epoch()
    assert trainer.evidence()["verdict"]["backdoor_suspected"] is False


@pytest.mark.parametrize("field,value", [("ratio", 0.0), ("steps", 0), ("suspect_threshold", -1.0), ("every", -1),
                                         ("warmup_steps", -1), ("anchor", "both"), ("alpha", 1.0), ("weight", 0.0)])
def test_blend_search_config_is_validated(field, value):
    with pytest.raises(ConfigError, match=f"blend_search.{field}"):
        recipe_config("cpu-blend", {f"blend_search.{field}": value})


def test_the_search_singles_out_a_blended_backdoors_target_without_data(blended_scenario):
    """On a blended-trigger teacher the data-free search flags exactly the target class, and the
    pattern it found is a working trigger on real images (checked here, by the experimenter)."""
    spec = blended_scenario.bundle.spec
    config = cpu_blend_recipe().replace(batch_size=64)
    trainer = DHBETrainer(blended_scenario.teacher, spec, config)
    search = trainer.extension("blend_search")
    search.probe(trainer)
    assert search.classes == [blended_scenario.target]
    assert search.bank.shape == (1, *spec.shape)
    test = blended_scenario.bundle.test
    others = test.images[test.labels != blended_scenario.target]
    with torch.no_grad():
        flipped = blended_scenario.teacher(blend_patterns(others, search.bank[:1].expand_as(others), 0.1)).argmax(1)
    assert (flipped == blended_scenario.target).float().mean() >= 0.8


def test_the_blend_term_lowers_a_blended_backdoors_asr_where_dhbe_alone_does_not(blended_scenario):
    """A shortened cpu-blend run against the same run without the blend term (DHBE's patch
    regulariser alone leaves a blended trigger at ~100%)."""
    spec = blended_scenario.bundle.spec
    short = recipe_config("cpu-blend", {"epochs": 12, "blend_search.every": 4, "student_ema": "off"})
    with_blend, _ = purify(blended_scenario.teacher, spec, short)
    without, _ = purify(blended_scenario.teacher, spec, short.without("blend_search"))
    asr_with = blended_scenario.evaluate(with_blend)["asr_x1"]
    asr_without = blended_scenario.evaluate(without)["asr_x1"]
    print("ASR with the blend term", asr_with, "without", asr_without)
    assert asr_without >= 0.9
    assert asr_with <= asr_without - 0.3
