"""ASHA's state kept with a sweep, so that a resumed sweep decides as the uninterrupted one would.

Tune (Ray 2.55) saves its searcher and its callbacks when it checkpoints an experiment, not its
scheduler: a resumed sweep's ASHA started with empty rungs and cut trials that the uninterrupted sweep
ran to the end. `KeepSchedulerState` is a callback whose state is ASHA's rungs (the scores recorded at
each milestone); it is pickled with the scheduler in the sweep folder's tuner.pkl (one object again on
restore), and Tune restores its state before the trials are queued again. The sweep folder is signed
before anything in it is unpickled (tuning/signing.py). Imports Ray: import it after `connect_ray`.
"""
from __future__ import annotations

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler


class KeepSchedulerState(Callback):
    def __init__(self, scheduler: AsyncHyperBandScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"rungs": [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]
                          for bracket in self.scheduler._brackets],
                "num_stopped": self.scheduler._num_stopped}

    def set_state(self, state: dict) -> None:
        for bracket, rungs in zip(self.scheduler._brackets, state["rungs"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self.scheduler._num_stopped = state["num_stopped"]
