"""The Ray Train job: data-parallel CPU workers that average their gradients, checkpoints, and
resuming after a worker that dies inside its Ray process."""
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_two_cpu_workers_average_their_gradients_and_hand_back_a_model(ray_local, tmp_path, teacher_file):
    """The two workers play one game, each on its slice of the batch (defense/dhbe/parallel.py): their
    students, batch-norm statistics included, are the same after every epoch. The test reads both
    workers' students after each epoch, inside the worker processes."""
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    record_dir = tmp_path / "students"
    record_dir.mkdir()

    def recording_loop(loop_config):
        import ray.train

        from deploy.ray_job import train_loop_per_worker

        def save_student(record, trainer, config):
            rank = ray.train.get_context().get_world_rank()
            torch.save({k: v.cpu() for k, v in trainer.student.state_dict().items()},
                       Path(str(record_dir)) / f"epoch{record.epoch}-rank{rank}.pt")

        train_loop_per_worker(loop_config, after_epoch=save_student)

    config = cpu_recipe().replace(epochs=2, iters_per_epoch=2, batch_size=16)
    job = PurifyJobConfig(recipe=config, workers=2, use_gpu=False)   # checkpoints beside the output
    temporary = set(Path("/tmp").glob("dhbe-ray-*"))
    result = run_purify_job(teacher_file, job, tmp_path / "purified", train_loop=recording_loop)
    assert {"purified.json", "purified.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / ".purified.checkpoints").exists()   # created beside the output, removed on success
    assert set(Path("/tmp").glob("dhbe-ray-*")) == temporary   # nothing with weights left in /tmp
    loaded = load_model(result.manifest_path)
    assert loaded.manifest["produced_by"]["input_weights_sha256"] == teacher_file.weights_sha256
    assert len(loaded.manifest["extra"]["history"]) == 2 and result.device == "cpu"
    for epoch in (1, 2):
        first = torch.load(record_dir / f"epoch{epoch}-rank0.pt", weights_only=True)
        second = torch.load(record_dir / f"epoch{epoch}-rank1.pt", weights_only=True)
        for key in first:  # gradients averaged, statistics of the whole batch: the same student
            assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
def test_a_worker_process_killed_with_sigkill_resumes_from_its_checkpoint(ray_local, tmp_path, teacher_file):
    """A real SIGKILL of the Ray Train worker process mid-purification (after epoch 2 reported; the
    epoch-1 checkpoint is registered by then): Ray restarts the worker and the job resumes from a
    checkpoint, not from scratch, and finishes every epoch."""
    from deploy.ray_job import PurifyJobConfig, run_purify_job

    marker = tmp_path / "killed-once"

    def killed_once_after_epoch_2(loop_config):
        from deploy.ray_job import train_loop_per_worker

        def fault(record, trainer, config):
            if record.epoch == 2 and not Path(str(marker)).exists():
                import os
                import signal

                Path(str(marker)).write_text(f"killed worker process {os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)   # the worker process dies at once, as under the OOM killer

        train_loop_per_worker(loop_config, after_epoch=fault)

    config = cpu_recipe().replace(epochs=4, iters_per_epoch=2, batch_size=16)
    job = PurifyJobConfig(recipe=config, workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"),
                          name="resume-test", max_failures=1)
    result = run_purify_job(teacher_file, job, tmp_path / "purified", train_loop=killed_once_after_epoch_2)
    assert marker.exists()                          # the kill did happen, inside the worker
    assert 1 <= result.resumed_from_epoch <= 2      # resumed from a checkpoint, not from scratch
    assert [h["epoch"] for h in result.history][-1] == 4
    assert not (tmp_path / "ray" / "resume-test").exists()   # checkpoints removed once it succeeded


@pytest.mark.slow
def test_a_local_ray_the_project_starts_refuses_a_process_without_its_token(tmp_path):
    """Ray 2.55 binds every interface; the project's local Ray requires a token only its own
    processes hold (deploy.ray_job.protect_local_ray): a stranger is refused, the token admits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    base_env = {"PYTHONPATH": root, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    stranger = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print('CONNECTED', ray.cluster_resources().get('CPU'))")
    host = f"""
import json, os, subprocess, sys
from deploy.ray_job import connect_ray
connect_ray()
import ray
address = ray.get_runtime_context().gcs_address
token = os.environ["RAY_AUTH_TOKEN"]
results = {{}}
for name, extra in (("stranger", {{}}), ("holder", {{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}})):
    env = {{**{base_env!r}, **extra}}
    done = subprocess.run([sys.executable, "-c", {stranger!r}, address], env=env, capture_output=True, text=True, timeout=90)
    results[name] = "CONNECTED" in done.stdout
print(json.dumps({{"mode": os.environ["RAY_AUTH_MODE"], "token_length": len(token), **results}}))
ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", host], env=base_env, capture_output=True, text=True, timeout=240)
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"mode": "token", "token_length": 64, "stranger": False, "holder": True}, done.stderr[-2000:]
