"""What the student meets perturbed (defense/dhbe/extensions/perturbations.py): one list of sources,
the scan's own triggers taken as found, one refresh rule, one mixing rule."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from defense.dhbe import DHBETrainer, purify, recipe_config, smoke_sized
from defense.dhbe.extensions.perturbations import Bank, roll_per_sample
from defense.models import build_model
from defense.scan import SuspectTrigger, VersionScores, decide, scan
from defense.scan.inversion import ScanSamples, invert_masks
from defense.spec import InputSpec

SPEC = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))


class CornerDetector(nn.Module):
    """A 'backdoored' toy model: class 1 when the bottom-right 2x2 corner is bright, else class 0."""

    def forward(self, x):
        corner = x[:, :, -2:, -2:].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(corner), 20 * (corner - 0.8)], dim=1)


def test_the_scans_inversion_hands_back_the_planted_corner_and_goes_on_from_a_start():
    samples = ScanSamples(0.5 * torch.rand(4, 32, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    found = invert_masks(CornerDetector(), samples, 2, steps=300, lr=0.1, cost=1e-3, success=0.9, classes=[1])
    mask, pattern = found.masks[0], found.patterns[0]
    assert found.areas[0] < 0.15                                    # a patch, not the whole image
    assert mask[0, -2:, -2:].mean() > 0.5 > mask[0, :-2, :-2].mean()   # where the trigger is
    stamped = (1 - mask) * samples.batch(0) + mask * pattern
    assert (CornerDetector()(stamped).argmax(1) == 1).float().mean() > 0.95
    again = invert_masks(CornerDetector(), samples, 2, steps=1, lr=1e-6, cost=1e-3, success=0.9, classes=[1],
                         start=(found.masks, found.patterns))
    assert torch.allclose(again.masks, found.masks, atol=1e-3)      # a start is where it goes on from


def test_roll_per_sample_moves_each_sample_by_its_own_offset():
    images = torch.zeros(2, 1, 4, 4)
    images[:, 0, 0, 0] = 1
    rolled = roll_per_sample(images, torch.tensor([1, 3]), torch.tensor([2, 0]))
    assert rolled[0, 0, 1, 2] == 1 and rolled[1, 0, 3, 0] == 1 and rolled.sum() == 2


def test_the_bank_keeps_the_newest_rows_and_round_trips():
    bank = Bank(3, torch.zeros(0, 2), torch.zeros(0))
    bank.add(torch.ones(2, 2), torch.tensor([1.0, 2.0]))
    bank.add(2 * torch.ones(2, 2), torch.tensor([3.0, 4.0]))
    assert len(bank) == 3 and bank.rows[1].tolist() == [2.0, 3.0, 4.0]
    assert bank.latest(1)[1].tolist() == [4.0]
    rows, values = bank.draw(50, torch.Generator().manual_seed(0))
    assert set(values.tolist()) <= {2.0, 3.0, 4.0} and torch.equal(rows[:, 0], (values > 2.5).float() + 1)
    restored = Bank(3, torch.zeros(0, 2), torch.zeros(0))
    restored.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.rows, bank.rows))


def suspect_report(recipe, target: int):
    """A scan's report naming `target`, with a trigger (a bright 3x3 corner) and samples, as scan() hands over."""
    scores = [0.0] * 10
    scores[target] = 9.0
    report = decide([VersionScores((0.5,) * 10, (0.5,) * 10, tuple(scores))], ["model"], [0.0] * 10, recipe.scan)
    mask = torch.zeros(1, 16, 16)
    mask[:, -3:, -3:] = 1.0
    return replace(report, triggers=(SuspectTrigger(target, mask, torch.ones(1, 16, 16)),),
                   samples=torch.rand(2, 4, 1, 16, 16))


def test_the_game_takes_the_scans_triggers_refreshes_them_on_s_and_resumes_them():
    teacher = build_model("small-cnn", SPEC).eval()
    recipe = smoke_sized(recipe_config("default", {"perturbations.refresh_every": 1}))
    report = suspect_report(recipe, 3)
    trainer = DHBETrainer(teacher, SPEC, recipe, scan=report)
    part = trainer.extension("perturbations")
    assert [s.name for s in part.sources] == ["patches", "scan_triggers", "blend_patterns"]
    triggers = part.sources[1]
    assert torch.equal(triggers.bank.rows[0][0].cpu(), report.triggers[0].mask)   # as the scan found it
    trainer.run_epoch()
    trainer.run_epoch()                        # epoch 1 % 1 == 0: the trigger re-found on S, from the latest
    assert len(triggers.bank) == 2 and triggers.refreshes == 1
    assert trainer.evidence()["perturbations"]["scan_triggers"]["targets"] == [3]
    blend = part.sources[2]
    assert len(blend.bank) == 2 and blend.refreshes == 1   # inverted on T before the game, then on S
    resumed = DHBETrainer(teacher, SPEC, recipe, scan=report)
    resumed.load_state_dict(trainer.state_dict())
    again = resumed.extension("perturbations").sources[1]
    assert again.refreshes == 1 and all(torch.equal(a, b) for a, b in zip(again.bank.rows, triggers.bank.rows))


def test_the_sources_take_turns_over_the_perturbed_rows_and_the_rest_stay_clean():
    teacher = build_model("small-cnn", SPEC).eval()
    recipe = smoke_sized(recipe_config("default", {"perturbations.warmup_steps": 0,
                                                   "perturbations.blend_patterns": False})).replace(batch_size=8)
    trainer = DHBETrainer(teacher, SPEC, recipe, scan=suspect_report(recipe, 3))
    x = torch.full((8, *SPEC.shape), 0.5)
    with torch.no_grad():
        mixed = trainer.perturb(x, trainer.latent(recipe.dhbe.trigger_latent_dim), "student")
    changed = (mixed != x).flatten(1).any(1).tolist()
    assert changed == [False, True] * 4                         # half the rows, spread evenly
    assert mixed[1, 0, -1, -1] == 1.0 or (mixed[1] == 1.0).sum() >= 9   # row 2: Gp's patches, row 4: the scan's
    assert (mixed[3] == 1.0).flatten().sum() >= 9                        # trigger (a 3x3 corner), moved or not
    with torch.no_grad():   # Gp's own step and the diagnostics meet Gp's patches only
        alone = trainer.perturb(x, trainer.latent(recipe.dhbe.trigger_latent_dim), "diagnostics")
    assert (alone != x).flatten(1).any(1).all()


def test_with_no_suspect_and_no_hand_back_the_game_runs_blind_on_gps_patches():
    teacher = build_model("small-cnn", SPEC).eval()
    recipe = smoke_sized(recipe_config("default", {"verdict.hand_back_clean": False}))
    nothing = decide([VersionScores(*[(0.0,) * 10] * 3)], ["model"], [0.0] * 10, recipe.scan)
    trainer = DHBETrainer(teacher, SPEC, recipe, scan=nothing)
    trainer.run_epoch()
    assert trainer.stop_reason is None and trainer.history[-1].loss_student > 0
    assert [s.name for s in trainer.extension("perturbations").sources] == ["patches"]
    assert trainer.evidence()["verdict"]["backdoor_suspected"] is False


@pytest.mark.slow
def test_the_suspects_sources_erase_a_blended_backdoor_that_gps_patches_alone_leave(blended_scenario):
    """Given the scan's suspect (the blended backdoor's target) and its trigger, a short default game
    lowers the ASR; the same game on Gp's patches alone (DHBE's patch regulariser) leaves it near 100%."""
    spec = blended_scenario.bundle.spec
    recipe = recipe_config("default", {"epochs": 12, "perturbations.refresh_every": 4, "verdict.min_agreement": 0})
    found = scan(blended_scenario.teacher, spec, (), replace(recipe.scan, threshold=1e-3))   # every class's trigger
    assert blended_scenario.target in found.suspects
    named = replace(found, suspects=(blended_scenario.target,),
                    triggers=tuple(t for t in found.triggers if t.target == blended_scenario.target))
    from defense.dhbe import train_epochs

    runs = {}
    alone = recipe.with_overrides({"perturbations.scan_triggers": False, "perturbations.blend_patterns": False})
    for name, game in (("with", recipe), ("without", alone)):
        trainer = DHBETrainer(blended_scenario.teacher, spec, game, scan=named)
        train_epochs(trainer)
        runs[name] = blended_scenario.evaluate(trainer.output_model().eval())["asr_x1"]
    print("ASR x1 with the suspect's sources", runs["with"], "with Gp's patches alone", runs["without"])
    assert runs["without"] >= 0.8
    assert runs["with"] <= runs["without"] - 0.3
