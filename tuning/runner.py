"""Runs a sweep with Ray Tune and writes its tables and plots."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from defense.fileio import atomic_path
from defense.report import figure, markdown_table
from tuning.signing import sign_folder, verify_folder
from tuning.trial import SCORE

SWEPT_ORDER = ("lam", "student_lr", "patch_size", "trigger_size")


def run_sweep(setup: dict, space: dict[str, list], samples: int, scheduler: str, out: Path, resume: bool,
              max_concurrent: Optional[int] = None, trainable_fn: Optional[Callable[[dict], None]] = None,
              quiet: bool = False) -> str:
    """`trainable_fn`: the trial body (default tuning.trial.trial)."""
    folder = out / "sweep"
    if resume:
        verify_folder(folder)   # before anything in it is unpickled, and before Ray starts
    from deploy.ray_job import connect_ray

    connect_ray()   # first: it protects a local Ray before Ray is imported
    import ray
    from ray import tune

    from tuning.scheduler_state import KeepSchedulerState   # imports Ray: after connect_ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if trainable_fn is None:
        from tuning.trial import trial as trainable_fn
    body = trainable_fn

    def dhbe_trial(params: dict) -> None:  # one name for Tune, whatever body runs (a resume checks it)
        body(params)

    trainable = tune.with_resources(dhbe_trial, {"cpu": 1})
    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
    else:
        param_space: dict[str, Any] = {"setup": setup, **{k: tune.grid_search(v) for k, v in space.items()}}
        if samples > 1:
            param_space["seed"] = tune.grid_search([setup["seed"] + i for i in range(samples)])
        epochs = setup["base"]["dhbe"]["epochs"]
        sched = (tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 3),
                                               reduction_factor=2) if scheduler == "asha" else None)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", scheduler=sched,
                                        max_concurrent_trials=max_concurrent or cpus),
            # Tune's own progress table while trials run (off with --quiet)
            run_config=tune.RunConfig(name="sweep", storage_path=str(out), verbose=0 if quiet else 1,
                                      callbacks=[KeepSchedulerState(sched)] if sched is not None else None),
        )
    watch = InterruptWatch()
    tune_log = logging.getLogger("ray.tune.tune")   # Ray's own level (ERROR) would drop the warning
    level, propagate = tune_log.level, tune_log.propagate
    tune_log.addHandler(watch)
    tune_log.setLevel(logging.WARNING)
    tune_log.propagate = False                       # ... and the driver says it in its own words
    try:
        grid = tuner.fit()
    finally:
        tune_log.removeHandler(watch)
        tune_log.setLevel(level)
        tune_log.propagate = propagate
        if folder.exists():
            sign_folder(folder)
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if watch.interrupted or unfinished > 0:
        raise SweepInterrupted(f"interrupted before every trial finished ({len(grid)} trials); no result is "
                               f"reported for a partial sweep; continue it with --resume --out {out}")
    table = write_results(grid, space, out)
    if grid.errors:
        raise SweepIncomplete(f"{len(grid.errors)} trial(s) failed ({grid.errors[0]!s:.120}); "
                              f"finished trials are kept: rerun with --resume --out {out}")
    return table


class InterruptWatch(logging.Handler):
    """Tune catches SIGINT itself, stops every trial (they then read as terminated) and returns
    normally; the one sign is its warning, which this handler on Tune's logger notices."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.interrupted = False

    def emit(self, record: logging.LogRecord) -> None:
        if "Stop signal received" in record.getMessage():
            self.interrupted = True


class SweepIncomplete(RuntimeError):
    """Some trials failed; the sweep can be resumed."""


class SweepInterrupted(SweepIncomplete):
    """The driver was interrupted before every trial finished; the sweep can be resumed."""


def write_results(grid, space: dict[str, list], out: Path) -> str:
    import pandas as pd

    frames, finals = [], []
    for index, result in enumerate(grid):
        config = {k: v for k, v in result.config.items() if k != "setup"}
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        # Tune records a result, then (a separate step) its checkpoint: an interrupt between the two
        # makes --resume run that epoch again from the previous checkpoint (bit for bit): one row per
        # epoch, the latest
        frame = frame.drop_duplicates("epoch", keep="last")
        frame = frame.assign(trial=index, **{f"config_{k}": v for k, v in config.items()})
        frames.append(frame)
        last = frame.iloc[-1]
        finals.append({"trial": index, **{f"config_{k}": v for k, v in config.items()},
                       "epochs_run": int(last["epoch"]), "stopped_early": not bool(last.get("final_epoch", False)),
                       SCORE: float(frame[SCORE].tail(3).mean()),
                       **{c: last[c] for c in frame.columns if c.startswith("eval_")}})
    if not frames:
        return "no trial reported a result"
    table = pd.concat(frames, ignore_index=True)
    keep = [c for c in table.columns if c.startswith(("config_", "eval_")) or c in (
        "trial", "epoch", "student_updates", "loss_distill", "loss_regulariser", "synthetic_agreement",
        "trigger_sensitivity", "trigger_flip_rate", "teacher_flip_rate", SCORE, "seconds")]
    table = table[keep]
    with atomic_path(out / "trials.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    final = pd.DataFrame(finals)
    with atomic_path(out / "final.csv") as tmp:
        final.to_csv(tmp, index=False)
    swept = [k for k in SWEPT_ORDER if k in space]
    plot(final, swept, out)
    lines = markdown_table(list(final.columns), final.round(4).itertuples(index=False))
    by_score = final.sort_values(SCORE, ascending=False).iloc[0]
    lines.append(f"best by data-free defender score: trial {int(by_score['trial'])}")
    if "eval_asr_x1" in final:
        oracle = final.sort_values(["eval_asr_x1", "eval_acc"], ascending=[True, False]).iloc[0]
        lines.append(f"oracle (selected by test ASR, unavailable to a defender): trial {int(oracle['trial'])}")
    return "\n".join(lines)


def plot(final, swept: list[str], out: Path) -> None:
    for key in swept:
        column = f"config_{key}"
        if column not in final:
            continue
        grouped = final.groupby(column)[[c for c in ("eval_acc", "eval_asr_x1", "eval_asr_x9") if c in final]].mean()
        with figure(out / f"sweep_{key}.png", figsize=(5, 3.2)) as ax:
            for metric in grouped.columns:
                ax.plot(grouped.index, 100 * grouped[metric], marker="o", label=metric.replace("eval_", "").upper())
            ax.set_xlabel(key), ax.set_ylabel("% (test set, evaluation only)"), ax.set_ylim(-2, 102)
            ax.legend(), ax.grid(alpha=0.3)
