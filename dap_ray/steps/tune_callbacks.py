"""Ray Tune callbacks and the trial scheduler of the sweeps (:mod:`dap_ray.steps.tune`).

They live at module level so that a sweep's saved state (Tune pickles its ``RunConfig`` and
``TuneConfig``, callbacks and scheduler included, into ``tuner.pkl``) names their class instead of
holding its code: a sweep resumed by a newer dap_ray runs the newer code. A class defined inside a
function is pickled with the code it had when the sweep began, and a resumed sweep then ran stale
code against current modules.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import ray.tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from dap_ray.progress import Progress

__all__ = ["BatchHalving", "TrialLines"]

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


class BatchHalving(FIFOScheduler):
    """Asynchronous successive halving (ASHA's rule) that reruns the same: a trial whose ``metric`` at
    a rung (``grace_period`` times powers of ``reduction_factor`` in ``time_attr``, below ``max_t``)
    falls under the ``1 - 1/reduction_factor`` quantile of the values recorded there is stopped,
    but only values of trials that had ended when this one was added count.

    With the searcher proposing in batches (Tune's ``ConcurrencyLimiter(batch=True)``: a batch
    starts once the one before has ended) those are exactly the earlier batches' trials, whatever
    order a batch's trials reach a rung in. Ray's ``ASHAScheduler`` judges a trial against whichever
    trials reached the rung first, so which trials it stops, and what the searcher hears, hang on
    timing. Trials of the first batch are never stopped.

    Given ``state_file`` (a JSON file in the sweep's folder), it writes its records there as they
    change and reads them back when the sweep resumes (Tune pickles the scheduler once, as the sweep
    begins, so its records would otherwise start empty): a resumed trial keeps the judges it began
    with, and a trial restarted after an error (Tune gives it a new id) inherits those of the failed
    trial with its config. The file runs ahead of Tune's saved state (saved every few seconds): a
    stop Tune missed is decided again, and trials Tune never saved are forgotten. Without the file
    a resumed sweep's earlier trials judge no one. The file's path is fixed as the sweep begins, so
    a sweep moved to another folder resumes without it.
    """

    def __init__(self, time_attr: str, max_t: float, grace_period: float, reduction_factor: float = 2,
                 metric: str | None = None, mode: str | None = None, state_file: str | None = None) -> None:
        super().__init__()
        if grace_period <= 0 or max_t < grace_period or reduction_factor <= 1:
            raise ValueError(f"need 0 < grace_period <= max_t and reduction_factor > 1, got grace_period "
                             f"{grace_period}, max_t {max_t}, reduction_factor {reduction_factor}")
        self.time_attr, self.reduction_factor, self.max_t = time_attr, reduction_factor, max_t
        self.rungs: list[float] = []
        rung = float(grace_period)
        while rung < max_t:
            self.rungs.append(rung)
            rung *= reduction_factor
        self._metric, self._mode = metric, mode
        self.records: dict[str, dict[float, float]] = {}  # trial id -> rung -> its metric there (larger is better)
        self.ended: list[str] = []
        self.judged_by: dict[str, tuple[str, ...]] = {}
        self.configs: dict[str, str] = {}  # trial id -> its config, to know a restarted trial
        self.errored: set[str] = set()
        self.state_file = state_file
        self._read = state_file is None
        self._unconfirmed: set[str] = set()  # trials read from the file that Tune has not added again yet

    def __setstate__(self, state: dict) -> None:
        # A sweep begun by an older dap_ray pickled its scheduler without the later attributes; it
        # resumes with what that version did (no stop at max_t: its trials ended on their own).
        self.__dict__.update({"max_t": math.inf, "configs": {}, "errored": set(), "state_file": None, "_read": True,
                              "_unconfirmed": set(), **state})

    def _load(self) -> None:
        self._read = True
        path = Path(self.state_file)
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.records = {t: {float(r): v for r, v in rungs.items()} for t, rungs in state["records"].items()}
        self.ended = list(state["ended"])
        self.judged_by = {t: tuple(js) for t, js in state["judged_by"].items()}
        self.configs = dict(state["configs"])
        self.errored = set(state["errored"])
        self._unconfirmed = set(self.judged_by)

    def _settle(self) -> None:
        """At the first trial proposed after a resume (Tune adds every restored trial first): forget
        the trials the file knew and Tune's saved state did not (it is saved every few seconds, the
        file at once), which the restored searcher proposes again under new ids."""
        for gone in self._unconfirmed:
            for held in (self.records, self.judged_by, self.configs):
                held.pop(gone, None)
            self.errored.discard(gone)
            if gone in self.ended:
                self.ended.remove(gone)
        self._unconfirmed = set()

    def _save(self) -> None:
        if self.state_file is None:
            return
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"records": self.records, "ended": self.ended, "judged_by": self.judged_by,
                                       "configs": self.configs, "errored": sorted(self.errored)}))
        os.replace(partial, path)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._metric is None or self._mode not in ("max", "min"):
            raise ValueError(f"BatchHalving needs a metric and a mode of max or min, got {self._metric!r} and "
                             f"{self._mode!r}")
        if not self._read:
            self._load()
        config = json.dumps(getattr(trial, "config", None), sort_keys=True, default=str)
        self._unconfirmed.discard(trial.trial_id)
        if getattr(trial, "status", None) == "TERMINATED":
            # A finished trial restored with its sweep: it judges, as it did before the resume.
            self.judged_by.setdefault(trial.trial_id, tuple(self.ended))
            self.configs.setdefault(trial.trial_id, config)
            self._end(trial)
            return
        if trial.trial_id not in self.judged_by and getattr(trial, "config", None) is not None:
            # A resumed sweep restarts an errored trial under a new id: it takes the place of the
            # failed trial with its config and keeps that one's judges.
            original = next((t for t in sorted(self.errored) if self.configs.get(t) == config), None)
            if original is not None:
                self._unconfirmed.discard(original)
                self.judged_by[trial.trial_id] = self.judged_by[original]
                self.errored.discard(original)
                if original in self.ended:
                    self.ended.remove(original)
        if trial.trial_id in self.judged_by:
            # Tune adds a failed trial again to retry it (FailureConfig), after telling of its error, and
            # an unfinished one again when its sweep resumes: it keeps the judges it began with (which
            # trials of its batch had ended by then is timing) and the rungs it passed before, where it
            # was not stopped.
            self.errored.discard(trial.trial_id)
            if trial.trial_id in self.ended:
                self.ended.remove(trial.trial_id)
        else:
            self._settle()
            self.judged_by[trial.trial_id] = tuple(self.ended)
        self.configs.setdefault(trial.trial_id, config)
        self._save()

    def _record(self, trial, result: dict) -> str:
        if self.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        value = float(result[self._metric]) * (1.0 if self._mode == "max" else -1.0)
        mine = self.records.setdefault(trial.trial_id, {})
        action = TrialScheduler.CONTINUE
        for rung in self.rungs:
            if result[self.time_attr] < rung:
                continue
            if rung not in mine:
                mine[rung] = value
                self._save()
            # A rung passed before (a retry, or a resumed trial whose stop Tune's saved state had not
            # caught up with) is judged again on its first value there: its judges' values are final,
            # so the decision is the one it had.
            earlier = [v for j in self.judged_by.get(trial.trial_id, ()) if j != trial.trial_id
                       and (v := self.records.get(j, {}).get(rung)) is not None and not math.isnan(v)]
            cutoff = np.percentile(earlier, (1 - 1 / self.reduction_factor) * 100) if earlier else None
            if cutoff is not None and not math.isnan(mine[rung]) and mine[rung] < cutoff:
                action = TrialScheduler.STOP
        return action

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._record(trial, result)
        # A trial at max_t is stopped, as ASHA does: Tune then marks its last result done in
        # result.json, which a finished trial's readers (and the cluster tier) look for.
        if result.get(self.time_attr, 0) >= self.max_t:
            return TrialScheduler.STOP
        return action

    def _end(self, trial) -> None:
        if trial.trial_id not in self.ended:
            self.ended.append(trial.trial_id)
            self._save()

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._record(trial, result)
        self._end(trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.errored.add(trial.trial_id)
        self._end(trial)
        self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._end(trial)

    def debug_string(self) -> str:
        return f"BatchHalving: rungs {self.rungs} of {self.time_attr}, {len(self.ended)} trials ended"
