"""Mixed precision (opt-in `precision=bf16`): the networks run under bf16 autocast, the logits and
Eq. 8's L1 stay fp32, the state_dict is unchanged, and a short game stays finite."""
import math

import pytest
import torch

from defense.dhbe import recipe_config, scanned_trainer, smoke_sized
from defense.dhbe.game import keep_logits_fp32
from defense.dhbe.losses import l1
from defense.errors import ConfigError


def test_logits_stay_fp32_under_bf16_autocast_and_the_state_dict_keys_do_not_change(badnets_scenario):
    import copy

    model = copy.deepcopy(badnets_scenario.teacher).eval()
    keys = list(model.state_dict())
    x = torch.rand(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16        # as it is, autocast gives bf16 logits
        keep_logits_fp32(model)
        assert model(x).dtype == torch.float32         # the head now computes in fp32
    assert list(model.state_dict()) == keys and model(x).dtype == torch.float32
    assert torch.allclose(copy.deepcopy(model)(x), model(x))   # copies (the EMA) keep the head


def test_l1_of_nearly_equal_logits_survives_bf16():
    a = torch.full((8, 10), 20.0)
    b = a + 0.01
    assert float(l1(a.bfloat16(), b.bfloat16())) == 0.0   # logits rounded to bf16 lose it: why they stay fp32
    assert float(l1(a, b)) == pytest.approx(0.01, rel=1e-3)


def test_a_bf16_game_stays_finite_and_uses_bf16_inside(badnets_scenario):
    recipe = smoke_sized(recipe_config("default", {"precision": "bf16", "verdict.hand_back_clean": False}))
    trainer = scanned_trainer(badnets_scenario.teacher, badnets_scenario.bundle.spec, recipe.replace(epochs=2))
    seen = []
    first_conv = next(m for m in trainer.student.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for _ in range(2):
        record = trainer.run_epoch()
        assert math.isfinite(record.loss_student) and record.recoveries == 0
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in trainer.output_model().parameters())
    with pytest.raises(ConfigError, match="precision"):
        recipe_config("default", {"precision": "fp16"})
