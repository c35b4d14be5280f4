"""Ray Tune callbacks of the sweeps (:mod:`dap_ray.steps.tune`).

They live at module level so that a sweep's saved state (Tune pickles its ``RunConfig``, callbacks
included, into ``tuner.pkl``) names their class instead of holding its code: a sweep resumed by
a newer dap_ray runs the newer code. A class defined inside a function is pickled with the code
it had when the sweep began, and a resumed sweep then ran stale code against current modules.
"""

from __future__ import annotations

import ray.tune

from dap_ray.progress import Progress

__all__ = ["TrialLines"]

FINISHED = ("TERMINATED", "ERROR")


class TrialLines(ray.tune.Callback):
    """Prints, as each of a sweep's ``trials`` ends, ``LABEL: 3/48 trials (6%), 0.05 trials/s,
    15m 00s left``.

    The rate counts only the trials this process finished, so a resumed sweep's time left is its
    own: the clock starts at the run's first step, and is not saved with the sweep's state.
    """

    def __init__(self, trials: int, label: str) -> None:
        self.trials, self.label = trials, label
        self._lines: Progress | None = None

    def __getstate__(self) -> dict:
        return {"trials": self.trials, "label": self.label, "_lines": None}

    def _progress(self, finished_before: int) -> Progress:
        if self._lines is None:
            self._lines = Progress(self.trials, "trials", done=finished_before, every_s=0)
        return self._lines

    def on_step_begin(self, iteration, trials, **info) -> None:
        self._progress(sum(t.status in FINISHED for t in trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # The ending trial is not marked terminated yet when Tune calls this.
        done = 1 + sum(t is not trial and t.status in FINISHED for t in trials)
        print(f"{self.label}: {self._progress(done - 1).line(done)}", flush=True)
