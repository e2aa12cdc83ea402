"""The Ray Train job: data-parallel CPU workers, checkpoints, and resuming after a killed worker."""
from dataclasses import replace

import pytest

from defense.dhbe import cpu_recipe
from defense.modelio import load_model, save_model


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from deploy.ray_job import connect_ray

    connect_ray()
    yield
    ray.shutdown()


@pytest.fixture()
def teacher_file(tmp_path, badnets_scenario):
    spec = badnets_scenario.bundle.spec
    return load_model(save_model(badnets_scenario.teacher, tmp_path / "teacher", "small-cnn", spec, {"tool": "test"}))


def test_two_cpu_workers_train_data_parallel_and_hand_back_a_model(ray_local, tmp_path, teacher_file):
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    config = replace(cpu_recipe(), epochs=2, iters_per_epoch=2, batch_size=16)
    job = PurifyJobConfig(dhbe=config, workers=2, use_gpu=False, storage_path=str(tmp_path / "ray"))
    result = run_purify_job(teacher_file, job, tmp_path / "purified")
    loaded = load_model(result.manifest_path)
    produced = loaded.manifest["produced_by"]
    assert produced["workers"] == 2 and produced["input_weights_sha256"] == teacher_file.weights_sha256
    assert len(loaded.manifest["extra"]["history"]) == 2 and result.device == "cpu"


def test_a_killed_worker_resumes_from_its_checkpoint(ray_local, tmp_path, teacher_file):
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    config = replace(cpu_recipe(), epochs=3, iters_per_epoch=2, batch_size=16)
    job = PurifyJobConfig(dhbe=config, workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"),
                          name="resume-test", fail_after_epoch=1, max_failures=1)
    result = run_purify_job(teacher_file, job, tmp_path / "purified")
    assert (tmp_path / "ray" / ".injected-failure-resume-test").exists()  # the failure did happen
    assert result.resumed_from_epoch == 1  # resumed from the epoch-1 checkpoint, not from scratch
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
