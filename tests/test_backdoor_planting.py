"""The foundation's attack really plants a backdoor, and a clean model really lacks it."""
from defense.scenario import backdoored_scenario


def test_poisoned_training_plants_a_backdoor(badnets_scenario):
    result = badnets_scenario.evaluate(badnets_scenario.teacher)
    print("backdoored", result)
    assert result["acc"] >= 0.95
    assert result["asr_x1"] >= 0.90 and result["asr_all_x1"] >= 0.90


def test_clean_training_has_no_backdoor(tmp_path):
    clean = backdoored_scenario("badnets", 16, 3, poison_rate=0.0, seed=0, cache=tmp_path)
    result = clean.evaluate(clean.teacher)
    print("clean", result)
    assert result["acc"] >= 0.95
    assert result["asr_x1"] <= 0.10 and result["asr_all_x1"] <= 0.10
