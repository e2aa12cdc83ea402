"""Each baseline changes what it should, and leaves alone what it should."""


import pytest
import torch

from defense.baselines import DEFENCES, DefenceConfig, clean_subset, conv_bn_pairs, defend, last_block
from defense.dhbe import cpu_recipe
from defense.errors import ConfigError
from defense.models import build_model

FAST = DefenceConfig(dhbe=cpu_recipe().replace(epochs=1, iters_per_epoch=2, batch_size=16),
                     finetune_epochs=2, nft_iterations=20)


@pytest.fixture(scope="module")
def clean(digits16):
    return clean_subset(digits16.train, per_class=5)


def test_registry_and_clean_data_budget(digits16, clean):
    assert {"dhbe", "adv-distill", "clp", "fine-tuning", "fine-pruning", "nad", "nft"} <= set(DEFENCES.names())
    assert len(clean) == 50 and torch.bincount(clean.labels).tolist() == [5] * 10
    model = build_model("small-cnn", digits16.spec)
    with pytest.raises(ConfigError, match="clean set"):
        defend("nft", model, digits16.spec, None)


def test_clp_prunes_the_channel_with_an_outsized_lipschitz_bound(digits16):
    torch.manual_seed(0)
    model = build_model("small-cnn", digits16.spec).eval()
    conv, bn = conv_bn_pairs(model)[1]
    with torch.no_grad():
        conv.weight[5] *= 50.0  # a "backdoor channel": huge gain
    out = defend("clp", model, digits16.spec, None)
    _, bn_after = conv_bn_pairs(out)[1]
    assert float(bn_after.weight[5]) == 0.0 and float(bn_after.bias[5]) == 0.0
    assert int((bn_after.weight == 0).sum()) <= 3  # only outliers go
    assert float(conv_bn_pairs(model)[1][1].weight[5]) != 0.0  # the input model is untouched


def test_fine_pruning_zeroes_the_least_active_last_block_channels(digits16, clean):
    model = build_model("small-cnn", digits16.spec).eval()
    out = defend("fine-pruning", model, digits16.spec, clean, FAST)
    _, bn = last_block(out)
    assert int((bn.weight == 0).sum()) == round(0.2 * bn.num_features)


def test_nft_moves_only_batch_norm_masks(digits16, clean, badnets_scenario):
    model = badnets_scenario.teacher
    out = defend("nft", model, digits16.spec, clean, FAST)
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    for name, p in after.items():
        is_bn = any(name.startswith(prefix) for prefix in _bn_prefixes(out))
        if not is_bn:
            assert torch.equal(p, before[name]), name  # conv/linear weights fixed
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert moved and all(any(n.startswith(p) for p in _bn_prefixes(out)) for n in moved)
    assert set(out.state_dict()) == set(model.state_dict())  # masks folded away: a plain model


def _bn_prefixes(model):
    return [name + "." for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("name", ["fine-tuning", "nad"])
def test_data_needing_defences_train_on_the_clean_set(digits16, clean, badnets_scenario, name):
    model = badnets_scenario.teacher
    out = defend(name, model, digits16.spec, clean, FAST)
    assert any(not torch.equal(a, b) for a, b in zip(out.parameters(), model.parameters()))
    assert badnets_scenario.evaluate(out)["acc"] >= 0.8


@pytest.mark.parametrize("name", ["dhbe", "adv-distill"])
def test_data_free_defences_ignore_the_clean_set(digits16, clean, badnets_scenario, name):
    out = defend(name, badnets_scenario.teacher, digits16.spec, clean, FAST)
    assert out(torch.rand(2, 1, 16, 16)).shape == (2, 10)
