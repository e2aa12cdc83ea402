import math

import pytest
import torch

from defense.data import Split
from defense.errors import ConfigError
from defense.metrics import (attack_success_rate, defence_effectiveness_rating, evaluate_backdoor, statistics_refitted,
                             robust_accuracy)
from defense.spec import InputSpec
from defense.triggers import (BlendedTrigger, TriggerConfig, checkerboard, grid_positions,
                              make_trigger, poison)

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


def test_checkerboard_matches_the_official_pattern():
    board = checkerboard(3, 3)
    assert board.shape == (3, 3, 3)
    assert board[0].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_patch_pasted_once_four_and_nine_times():
    trigger = make_trigger("badnets", SPEC, TriggerConfig(3))
    images = torch.full((2, 1, 16, 16), 0.5)
    once = trigger.paste_copies(images, 1)
    assert once[0, 0, 13:, 13:].tolist() == checkerboard(3, 1)[0].tolist()
    assert (once[0, 0, :13] == 0.5).all()
    assert grid_positions(4, 16, 16, 3) == [(0, 0), (0, 13), (13, 0), (13, 13)]
    nine = trigger.paste_copies(images, 9)
    assert (nine != 0.5).sum() == 2 * 9 * 9  # 9 disjoint 3x3 copies per image
    assert sorted(grid_positions(9, 16, 16, 3))[4] == (6, 6)
    assert torch.equal(images, torch.full((2, 1, 16, 16), 0.5))  # input untouched


def test_blended_and_sig_triggers():
    pattern = torch.ones(1, 16, 16)
    blended = BlendedTrigger(pattern, 0.2).paste(torch.zeros(1, 1, 16, 16))
    assert torch.allclose(blended, torch.full_like(blended, 0.2))
    assert BlendedTrigger(pattern, 0.2).paste_copies(blended, 4) is None
    sig = make_trigger("sig", SPEC).paste(torch.full((1, 1, 16, 16), 0.5))
    assert float((sig - 0.5).abs().max()) == pytest.approx(0.1, abs=1e-3)


def test_dba_parts_split_the_trigger_rows():
    trigger = make_trigger("dba", SPEC, TriggerConfig(3))
    parts = [trigger.part(i, 2) for i in range(2)]
    assert torch.equal(parts[0].mask + parts[1].mask, torch.ones(3, 3))
    assert parts[0].mask[:2].all() and not parts[0].mask[2].any()


def test_poisoning_rate_and_all_to_one_target():
    images = torch.rand(100, 1, 16, 16)
    labels = torch.arange(100) % 10
    trigger = make_trigger("badnets", SPEC)
    poisoned, idx = poison(Split(images, labels), trigger, 0.1, target=3, seed=0)
    assert len(idx) == 10 and (labels[idx] != 3).all() and (poisoned.labels[idx] == 3).all()
    assert torch.equal(poisoned.images[idx], trigger.paste(images[idx]))
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.images[untouched], images[untouched])
    with pytest.raises(ConfigError):
        poison(Split(images, labels), trigger, 1.5, 3, 0)


def test_asr_forms_ra_and_der_on_hand_made_cases():
    labels = torch.tensor([0, 1, 2, 3, 1])
    clean = torch.tensor([0, 1, 2, 0, 2])     # images 3 and 4 misclassified when clean
    triggered = torch.tensor([0, 0, 2, 0, 0])
    # DHBE form: non-target and clean-correct -> indices 1, 2 -> one of two flips to 0
    assert attack_success_rate(clean, triggered, labels, 0, only_correct=True) == 0.5
    # BackdoorBench form: all non-target -> indices 1..4 -> 3 of 4
    assert attack_success_rate(clean, triggered, labels, 0, only_correct=False) == 0.75
    assert robust_accuracy(triggered, labels, 0) == 0.25
    before, after = {"acc": 0.95, "asr_x1": 1.0}, {"acc": 0.93, "asr_x1": 0.02}
    assert defence_effectiveness_rating(before, after) == pytest.approx((0.98 - 0.02 + 1) / 2)


def test_evaluate_backdoor_on_a_model_that_obeys_the_trigger():
    class Obeys(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # class 0 if the bottom-right pixel is set, else class 1
            out = torch.zeros(len(x), 10)
            out[:, 1] = 1.0
            out[x[:, 0, -1, -1] > 0.9, 0] = 5.0
            return out

    test = Split(torch.zeros(6, 1, 16, 16), torch.tensor([1, 1, 1, 2, 0, 1]))
    result = evaluate_backdoor(Obeys(), test, make_trigger("badnets", SPEC), target=0)
    assert result["acc"] == pytest.approx(4 / 6)
    assert result["asr_x1"] == 1.0 and result["asr_x9"] == 1.0 and result["ra"] == 0.0
    assert math.isclose(result["asr_all_x1"], 1.0)


def test_statistics_refitted_on_clean_images_undo_statistics_polluted_by_perturbed_inputs(clean_scenario):
    """The experimenter's refit check (docs/research/dhbe-log.md, fifteenth round): batch-norm statistics estimated on
    perturbed inputs cost a model its accuracy; re-estimated on clean images they give it back, and
    only the statistics change."""
    import copy

    bundle = clean_scenario.bundle
    acc = lambda model: evaluate_backdoor(model.eval(), bundle.test, None, 0)["acc"]
    polluted = copy.deepcopy(clean_scenario.teacher).train()
    with torch.no_grad():
        for _ in range(30):
            polluted(torch.rand(128, *bundle.spec.shape) * 3)
    state = {k: v.clone() for k, v in polluted.state_dict().items()}
    refitted = statistics_refitted(polluted, bundle.train.images)
    assert acc(polluted) < acc(clean_scenario.teacher) - 0.3
    assert acc(refitted) > acc(clean_scenario.teacher) - 0.02
    assert all(torch.equal(v, polluted.state_dict()[k]) for k, v in state.items())   # the input is untouched
    buffers = {name for name, _ in refitted.named_buffers()}
    assert all(torch.equal(refitted.state_dict()[k], v) for k, v in state.items() if k not in buffers)
    assert not refitted.training
