import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits16():
    from defense.data import load_dataset

    return load_dataset("digits", image_size=16)


@pytest.fixture(scope="session")
def badnets_scenario(tmp_path_factory):
    """A small CNN backdoored centrally with a 3x3 patch at 10% on digits 16x16 (the foundation's attack)."""
    from defense.scenario import backdoored_scenario

    return backdoored_scenario("badnets", 16, 3, 0.1, target=0, seed=0, cache=tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def blended_scenario(tmp_path_factory):
    """The same model backdoored with a blended trigger (uniform-noise pattern at ratio 0.2)."""
    from defense.scenario import backdoored_scenario

    return backdoored_scenario("blended", 16, 3, 0.1, target=0, seed=0, cache=tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def clean_scenario(tmp_path_factory):
    """The same small CNN trained on clean digits (poison rate 0): nothing to erase."""
    from defense.scenario import backdoored_scenario

    return backdoored_scenario("badnets", 16, 3, 0.0, target=0, seed=0, cache=tmp_path_factory.mktemp("teachers"))


@pytest.fixture(autouse=True)
def own_config_folder(tmp_path_factory, monkeypatch):
    """Each test's sweep-signing key lives in a folder of its own, never in the user's ~/.config."""
    monkeypatch.setenv("BACKDOOR_PURIFY_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
