"""Data-parallel DHBE (defense/dhbe/parallel.py): 2 CPU processes (gloo) play the game one process
plays with the whole batch. In float64 they agree to 1e-5 after 2 iterations (measured: ~1e-13), the
official game and the default with every extension on; with one part of the split left out they do
not, so the check can fail. (float32 drifts at rounding level, amplified by L1's sign and Adam's first
steps: tests/helpers/data_parallel_check.py prints both.)"""
import pytest

from helpers.data_parallel_check import compare, every_extension_tiny, official_tiny
from defense.errors import ConfigError


@pytest.mark.parametrize("recipe", [official_tiny, every_extension_tiny], ids=["official", "every-extension"])
def test_two_processes_match_one_process_with_the_whole_batch(recipe):
    result = compare(recipe(), workers=2)
    assert result["stopped"] == [None, None, None]          # the game ran in all three
    assert result["student_moved_by"] > 0.1                   # and S moved away from T
    assert result["max_weight_difference"] < 1e-5, result     # S, G, Gp: weights and BN statistics
    assert result["max_loss_difference"] < 1e-6, result


def test_without_synchronised_batch_norm_the_processes_do_not_match():
    result = compare(official_tiny(), workers=2, leave_out="batch_norm_sync")
    assert result["max_weight_difference"] > 1e-3, result


def test_a_batch_that_does_not_split_evenly_is_refused_before_anything_runs():
    from deploy.ray_job import PurifyJobConfig

    with pytest.raises(ConfigError, match="multiple of the number of workers"):
        PurifyJobConfig(recipe=official_tiny(), workers=3)      # batch 16
