"""Neural Cleanse's mask-and-pattern inversion (defense/mask_search.py) and the `mask_search` extension."""
import torch
from torch import nn

from defense.dhbe import DHBETrainer, recipe_config, smoke_sized
from defense.dhbe.extensions.mask_search import roll_per_sample
from defense.mask_search import apply_mask_trigger, invert_mask_trigger
from defense.scan import VersionScores, decide


class CornerDetector(nn.Module):
    """A 'backdoored' toy model: class 1 when the bottom-right 2x2 corner is bright, else class 0."""

    def forward(self, x):
        corner = x[:, :, -2:, -2:].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(corner), 20 * (corner - 0.8)], dim=1)


def test_the_inversion_finds_the_planted_corner_and_a_small_mask():
    generator = torch.Generator().manual_seed(0)
    samples = lambda: 0.5 * torch.rand(32, 1, 8, 8, generator=generator)
    found = invert_mask_trigger(CornerDetector(), samples, target=1, steps=300, lr=0.1, cost=1e-3)
    assert found.success >= 0.99
    assert found.mask_mean < 0.15                                   # a patch, not the whole image
    corner, rest = found.mask[0, -2:, -2:].mean(), found.mask[0, :-2, :-2].mean()
    assert corner > 0.5 > rest                                      # where the trigger is
    stamped = apply_mask_trigger(samples(), found.mask, found.pattern)
    assert (CornerDetector()(stamped).argmax(1) == 1).float().mean() > 0.95


def test_roll_per_sample_moves_each_sample_by_its_own_offset():
    images = torch.zeros(2, 1, 4, 4)
    images[:, 0, 0, 0] = 1
    rolled = roll_per_sample(images, torch.tensor([1, 3]), torch.tensor([2, 0]))
    assert rolled[0, 0, 1, 2] == 1 and rolled[1, 0, 3, 0] == 1 and rolled.sum() == 2


def test_the_default_searches_the_suspect_and_reports_it(badnets_scenario):
    recipe = smoke_sized(recipe_config("default"))
    every = decide([VersionScores(*[(9.0,) * 10] * 3)], ["model"], [0.0] * 10, recipe.scan)   # every class suspect
    trainer = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, recipe, scan=every)
    trainer.run_epoch()
    report = trainer.evidence()["mask_search"]
    assert len(report["triggers"]) == badnets_scenario.bundle.spec.num_classes
    state = trainer.state_dict()
    again = DHBETrainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, recipe, scan=every)
    again.load_state_dict(state)
    assert [t.target for t in again.extension("mask_search").bank] == [t.target for t in trainer.extension("mask_search").bank]
