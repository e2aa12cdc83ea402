"""Ray Tune sweeps: a 2-trial sweep end to end, and an interrupted sweep resumed."""
import json

import pyarrow.parquet as pq
import pytest

from defense.modelio import save_model


@pytest.fixture()
def model_file(tmp_path, badnets_scenario):
    save_model(badnets_scenario.teacher, tmp_path / "teacher", "small-cnn", badnets_scenario.bundle.spec, {"tool": "test"})
    return tmp_path / "teacher.json"


TINY = ["--recipe", "cpu", "--set", "epochs=2", "iters_per_epoch=2", "batch_size=16"]


def _space(monkeypatch):
    import tuning.sweep as sweep

    monkeypatch.setitem(sweep.PRESETS, "lambda", {"lam": [0.0, 1.0]})


def test_a_signature_covers_folders_modes_and_odd_entries_and_the_key_is_kept_private(tmp_path):
    """An added empty folder, a changed mode or an added FIFO voids the signature (a FIFO is refused
    without being read: reading it would block); a key others can read, or a key path that is a folder,
    is refused in one line before anything is signed."""
    import os

    from defense.errors import UnsafeFileError
    from tuning.signing import KEY_NAME, config_dir, sign_folder, verify_folder

    folder = tmp_path / "sweep"
    (folder / "trial_0").mkdir(parents=True)
    (folder / "trial_0" / "params.pkl").write_bytes(b"params")
    sign_folder(folder)
    verify_folder(folder)
    (folder / "empty").mkdir()
    with pytest.raises(UnsafeFileError, match="changed"):
        verify_folder(folder)
    (folder / "empty").rmdir()
    verify_folder(folder)
    os.chmod(folder / "trial_0" / "params.pkl", 0o777)
    with pytest.raises(UnsafeFileError, match="changed"):
        verify_folder(folder)
    os.chmod(folder / "trial_0" / "params.pkl", 0o644)
    sign_folder(folder)
    os.mkfifo(folder / "trial_0" / "pipe")
    with pytest.raises(UnsafeFileError, match="not a plain file"):
        verify_folder(folder)
    (folder / "trial_0" / "pipe").unlink()
    verify_folder(folder)
    key = config_dir() / KEY_NAME
    os.chmod(key, 0o644)
    with pytest.raises(UnsafeFileError, match="read or changed by others"):
        verify_folder(folder)
    with pytest.raises(UnsafeFileError, match="read or changed by others"):
        sign_folder(folder)
    key.unlink()
    key.mkdir()
    with pytest.raises(UnsafeFileError, match="not a plain file"):
        sign_folder(folder)


@pytest.mark.slow
def test_two_trial_sweep_writes_tables_and_plots(tmp_path, model_file, monkeypatch):
    from tuning.sweep import main

    _space(monkeypatch)
    out = tmp_path / "sweep"
    assert main([str(model_file), "--preset", "lambda", "--scheduler", "none", "--out", str(out), *TINY]) == 0
    table = pq.read_table(out / "trials.parquet").to_pandas()
    assert sorted(table["config_lam"].unique()) == [0.0, 1.0]
    for column in ("trial", "epoch", "synthetic_agreement", "trigger_flip_rate", "defender_score",
                   "eval_acc", "eval_asr_x1", "eval_asr_x9"):
        assert column in table.columns
    assert len(table) == 4  # 2 trials x 2 epochs
    final = (out / "final.csv").read_text()
    assert final.startswith("trial,") and len(final.strip().splitlines()) == 3
    assert (out / "sweep_lam.png").stat().st_size > 1000


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path, model_file, monkeypatch):
    from tuning.sweep import main

    _space(monkeypatch)
    out = tmp_path / "sweep"
    marker = tmp_path / "failed-once"

    def dies_once_at_lambda_1(params):
        from pathlib import Path

        from tuning.trial import trial

        if params.get("lam") == 1.0 and not Path(str(marker)).exists():
            trial_log = Path(params["setup"]["out"]) / "trial_starts.log"
            with open(trial_log, "a") as log:
                log.write(json.dumps({"lam": 1.0}) + "\n")
            Path(str(marker)).write_text("failed once\n")
            raise RuntimeError("planted trial failure")
        trial(params)

    # The lambda = 1 trial dies once (a fault planted in the trial's process), as if the sweep had been interrupted.
    assert main([str(model_file), "--preset", "lambda", "--scheduler", "none", "--out", str(out), *TINY],
                trainable=dies_once_at_lambda_1) == 1
    assert main([str(model_file), "--resume", "--out", str(out)]) == 0
    starts = [json.loads(line) for line in (out / "trial_starts.log").read_text().splitlines()]
    assert starts.count({"lam": 0.0}) == 1      # finished trial not redone
    assert starts.count({"lam": 1.0}) == 2      # the interrupted one ran again
    table = pq.read_table(out / "trials.parquet").to_pandas()
    assert sorted(table["config_lam"].unique()) == [0.0, 1.0] and len(table) == 4


def test_resume_refuses_a_sweep_folder_this_project_did_not_sign_and_never_unpickles_it(tmp_path, model_file):
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "sweep"
    (out / "sweep").mkdir(parents=True)
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (out / "sweep" / "tuner.pkl").write_bytes(pickle.dumps(Exploit()))
    env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin",
           "BACKDOOR_PURIFY_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-m", "tuning.sweep", str(model_file), "--resume", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "refusing to resume" in done.stderr and "no signature" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_a_signed_sweep_folder_that_was_changed_is_refused(tmp_path):
    from defense.errors import UnsafeFileError
    from tuning.signing import sign_folder, verify_folder

    folder = tmp_path / "sweep"
    (folder / "trial_0").mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"state")
    (folder / "trial_0" / "params.pkl").write_bytes(b"params")
    sign_folder(folder)
    verify_folder(folder)                                  # as written: accepted
    (folder / "trial_0" / "params.pkl").write_bytes(b"evil!!")
    with pytest.raises(UnsafeFileError, match="changed"):
        verify_folder(folder)
    (folder / "trial_0" / "params.pkl").write_bytes(b"params")
    verify_folder(folder)
    (folder / "trial_0" / "extra.pkl").write_bytes(b"new")  # an added file
    with pytest.raises(UnsafeFileError, match="changed"):
        verify_folder(folder)
    (folder / "trial_0" / "extra.pkl").unlink()
    import os

    os.environ["BACKDOOR_PURIFY_CONFIG_DIR"] = str(tmp_path / "another-user")   # restored by the fixture
    with pytest.raises(UnsafeFileError, match="key this user does not have"):
        verify_folder(folder)


@pytest.mark.slow
def test_sigint_to_a_real_sweep_driver_then_resume_reaches_the_uninterrupted_result(tmp_path, model_file):
    """A real driver process gets SIGINT while its third trial runs: it exits 130 and says how to
    resume; the resumed sweep ends exactly as an uninterrupted one with the same seed (ASHA, trials one
    at a time so that its decisions do not depend on timing): the same epochs per trial, the same
    scores. Without the scheduler's kept state, the resumed ASHA ran the last two trials of this very
    sweep to the end (docs/reliability.md)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pandas as pd

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
           "BACKDOOR_PURIFY_CONFIG_DIR": str(tmp_path / "config")}

    def sweep(out, *extra):
        return [sys.executable, "-m", "tuning.sweep", str(model_file), "--out", str(out), "--quiet", *extra]

    settings = ["--preset", "lr", "--scheduler", "asha", "--max-concurrent", "1", "--recipe", "cpu", "--set",
                "epochs=6", "iters_per_epoch=2", "batch_size=16"]
    whole = subprocess.run(sweep(tmp_path / "whole", *settings), env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "interrupted"
    driver = subprocess.Popen(sweep(out, *settings), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        progress = sorted((out / "sweep").glob("*/progress.csv"), key=lambda p: p.stat().st_ctime)
        if len(progress) >= 3 and len(progress[-1].read_text().splitlines()) >= 4:   # trial 3 past epoch 2
            break
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "--resume" in stderr and not (out / "final.csv").exists()
    assert (out / "sweep.signature.json").exists()    # signed: this project's own folder can be resumed
    resumed = subprocess.run(sweep(out, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    columns = ["config_student_lr", "epochs_run", "stopped_early", "defender_score"]
    expected = pd.read_csv(tmp_path / "whole" / "final.csv")[columns].sort_values("config_student_lr")
    got = pd.read_csv(out / "final.csv")[columns].sort_values("config_student_lr")
    assert expected["stopped_early"].any() and not expected["stopped_early"].all()   # ASHA did cut some
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    for progress in (out / "sweep").glob("*/progress.csv"):   # continued from checkpoints, not rerun from the start:
        # at most the epoch whose checkpoint Tune had not yet registered when the signal came runs twice
        epochs = pd.read_csv(progress)["epoch"].tolist()
        assert epochs[0] == 1 and all(b in (a, a + 1) for a, b in zip(epochs, epochs[1:])), (progress.parent.name, epochs)
        assert len(epochs) - len(set(epochs)) <= 1, (progress.parent.name, epochs)


def test_the_kept_scheduler_state_makes_a_fresh_asha_decide_as_the_first():
    from ray.tune.schedulers import ASHAScheduler

    from tuning.scheduler_state import KeepSchedulerState

    class Trial:   # what ASHA reads of a trial
        def __init__(self, trial_id):
            self.trial_id = trial_id

    def asha():
        scheduler = ASHAScheduler(time_attr="epoch", max_t=6, grace_period=2, reduction_factor=2)
        scheduler.set_search_properties("score", "max")
        return scheduler

    first = asha()
    for name, scores in (("a", [0.9, 0.9, 0.9, 0.9]), ("b", [0.5, 0.5, 0.5, 0.5])):
        first.on_trial_add(None, Trial(name))
        for epoch, score in enumerate(scores, 1):
            first.on_trial_result(None, Trial(name), {"epoch": epoch, "score": score})
    state = KeepSchedulerState(first).get_state()
    fresh, kept = asha(), asha()
    KeepSchedulerState(kept).set_state(state)
    for scheduler in (first, fresh, kept):
        scheduler.on_trial_add(None, Trial("c"))
    late = {"epoch": 2, "score": 0.1}     # worse than what the rung at epoch 2 recorded
    assert first.on_trial_result(None, Trial("c"), late) == "STOP"
    assert kept.on_trial_result(None, Trial("c"), late) == "STOP"
    assert fresh.on_trial_result(None, Trial("c"), late) == "CONTINUE"   # an empty rung cuts nothing


def test_a_bad_experiment_record_is_refused_once_before_any_trial(tmp_path, badnets_scenario):
    """The model loads, but its record names a data set the sweep cannot load, or a flag puts the
    target outside its classes: one ConfigError before Ray starts, no trial, no sweep folder."""
    import pytest

    from defense.errors import ConfigError
    from tuning.sweep import main

    spec = badnets_scenario.bundle.spec
    save_model(badnets_scenario.teacher, tmp_path / "cifar", "small-cnn", spec, {"tool": "test"},
               experiment={"dataset": "cifar10", "image_size": spec.height, "attack": "badnets"})
    started = []
    for argv, message in (([str(tmp_path / "cifar.json")], "needs --data-dir"),
                          ([str(tmp_path / "cifar.json"), "--dataset", "digits", "--target", "12"], "--target")):
        with pytest.raises(ConfigError, match=message):
            main(argv + ["--out", str(tmp_path / "sweep"), *TINY], trainable=lambda params: started.append(params))
    assert not started and not (tmp_path / "sweep").exists()


def test_an_epoch_run_twice_after_an_interrupt_counts_once(tmp_path):
    """Tune writes a result row before it registers that epoch's checkpoint; a SIGINT between the two
    makes --resume run the epoch again (the same numbers), and progress holds it twice. The trial's
    score (the mean of its last three epochs) must not count it twice: -0.042, not -0.125."""
    from types import SimpleNamespace

    import pandas as pd

    from tuning.runner import write_results
    from tuning.trial import SCORE

    scores = [-0.25, 0.0625, 0.0, -0.1875]
    rows = [{"epoch": e, SCORE: s, "synthetic_agreement": 0.5} for e, s in zip([1, 2, 3, 4, 4], scores + scores[-1:])]
    grid = [SimpleNamespace(config={"student_lr": 0.05, "setup": {}}, metrics_dataframe=pd.DataFrame(rows))]
    write_results(grid, {"student_lr": [0.05]}, tmp_path)
    final = pd.read_csv(tmp_path / "final.csv")
    assert final["epochs_run"].tolist() == [4]
    assert final[SCORE].iloc[0] == pytest.approx(sum(scores[1:]) / 3)
    assert pd.read_parquet(tmp_path / "trials.parquet")["epoch"].tolist() == [1, 2, 3, 4]
