"""``--backend ray``: the study's trials run as Ray Tune trials, on the same Optuna study.

How the pieces fit:

- The study is the SearchStudy's own: ``SearchStudy.open`` runs first, exactly as on the Optuna
  path (same storage and name, two "minimize" objectives, settings check, warm starts enqueued
  once, dead trials recovered).
- Ray Tune asks that study for trials through ``OptunaSearch`` (``_StudySearch``, a thin
  subclass handed the opened study itself rather than ``storage=``/``study_name=``, so the
  sampler and directions are exactly the Optuna path's). Its define-by-run function is
  ``SearchStudy.objective`` itself, run in the driver up to the point where the allocation
  would be scored: ``ps.suggest``, decode + repair to the budget (or a warm start's fixed
  allocation), the cost attrs and the budget constraint, the surrogate screen. These are
  cheap, screening needs the study (it compares with the completed trials), and the
  constraint must be on the trial before it is told (the samplers are constrained).
  Infeasible and screened trials are told at once and never reach Ray.
- The Ray trainable scores the allocation on a worker. The evaluator (model, calibration
  tensors, reference logits) goes to the object store once (``ray.put``, handed over with
  ``tune.with_parameters``) and each worker keeps it, with its cache of compressed layers,
  across the trials it runs (``reuse_actors``).
- OptunaSearch cannot put user attrs on its trials from a trainable, so ``on_trial_complete``
  (overridden) writes the reported scores onto the trial with ``storage.set_trial_user_attr``
  and then tells it; the Tune trial id maps to the Optuna trial number recorded at ``suggest``.
  Ray trials thus carry the same user attrs as Optuna-path trials (allocation, scale,
  params/macs_fraction, constraint, predicted, top1, kl, loss, agreement, warm_start, ...)
  plus ``ray_trial``.
- The searcher stops suggesting once evaluated-within-budget + running trials reach
  ``cfg.trials`` and ends the experiment when the evaluated ones do (the count of
  SearchStudy.run: infeasible trials do not count), so Ray reaches the total exactly unless
  other workers share the study. A killed trial process is retried by Ray (``max_failures=2``).
- ``--resume`` restores the interrupted Tune experiment in ``OUT/ray_results/STUDY``: the
  trials it had running run again under their own Optuna trials (which therefore stay RUNNING
  until then), at the concurrency it was started with; if the total is still not reached, a
  fresh experiment continues the study.
  Without ``--resume`` a fresh experiment replaces the old one, and trials the dead driver had
  running are failed and enqueued again, as on the Optuna path.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from autohybrid.config import SearchConfig
from autohybrid.exceptions import ConfigError
from autohybrid.io import pid_alive
from autohybrid.search.objective import Evaluator, NumericalError
from autohybrid.search.params import ParamSpace
from autohybrid.search.study import SearchStudy, _load, _requeue, within_budget
from autohybrid.search.surrogate import Surrogate

__all__ = ["run_ray"]

# Quiet and offline: no usage stats, no dashboard, no Tune tables or result loggers.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0",
             "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
ALLOCATION, FRACTION = "allocation", "fraction"  # the config keys a trainable gets
RESULTS = "ray_results"

_ACTIVE: _Driver | None = None  # the run_ray call in progress (re-attaches restored searchers)


def run_ray(
    cfg: SearchConfig,
    storage: optuna.storages.BaseStorage,
    study_name: str,
    ps: ParamSpace,
    evaluator: Evaluator,
    surrogate: Surrogate | None,
    identity: dict,
    warm: dict | None,
) -> optuna.Study:
    """Run the study's trials on Ray until ``cfg.trials`` of them are evaluated within the
    budget (infeasible ones, told without a Ray trial, do not count)."""
    global _ACTIVE
    from autohybrid.search.run import _progress, console

    path = (Path(cfg.out) / RESULTS / re.sub(r"[^\w.-]+", "_", study_name)).resolve()
    restore = cfg.resume and tune.Tuner.can_restore(str(path))
    # a restored experiment reruns the trials it had running: recover the others only once
    # the searcher has been restored and knows which (keep=None defers recovery until then)
    ss = _RayStudy(cfg, storage, study_name, ps, _ScoreOnRay(), surrogate, identity,
                   keep=None if restore else set())
    ss.open(warm)
    driver = _Driver(ss)
    started = _init_ray(cfg)
    _ACTIVE = driver
    try:
        shared = {"evaluator": ray.put(evaluator), "quality": cfg.quality,
                  "cost": driver.cost_key}
        trainable = tune.with_parameters(_trainable, shared=shared)
        with _progress(cfg) as on_trial:
            driver.on_trial = on_trial
            if cfg.resume and not restore:
                console.print(f"no Ray Tune experiment to resume in {path}; starting one")
            if restore:
                console.print(f"resuming the Ray Tune experiment {path}")
                _fit(driver, tune.Tuner.restore(str(path), trainable, resume_errored=True),
                     path)
                ss.keep = set()
                ss._recover_dead_local_trials()
            if driver.counts(fresh=True)[0] < cfg.trials:
                shutil.rmtree(path, ignore_errors=True)
                _fit(driver, _new_tuner(driver, trainable, path), path)
    finally:
        _ACTIVE = None
        if started:
            ray.shutdown()
    return ss.study


def _init_ray(cfg: SearchConfig) -> bool:
    """Start (or join) Ray; False when this process already had it running."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if cfg.ray_address and not _reachable(cfg.ray_address):  # ray.init would retry for minutes
        raise ConfigError(f"cannot reach Ray at {cfg.ray_address!r}; start it with `ray start "
                          "--head` there, or leave out --ray-address for a local Ray")
    try:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **quiet)
        else:
            ray.init(address="local", num_cpus=cfg.concurrency, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = cfg.ray_address or "a local Ray instance"
        raise ConfigError(f"cannot start Ray on {where}: {str(e).splitlines()[0][:200]}; "
                          "check --ray-address (e.g. 'auto' after `ray start --head`)") from None
    return True


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """False when ``[ray://]HOST:PORT`` refuses connections; True for anything else (auto)."""
    m = re.fullmatch(r"(?:ray://)?\[?([\w.:-]+?)\]?:(\d+)", address)
    if not m:
        return True
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError:
        return False
    return True


def _new_tuner(driver: _Driver, trainable, path: Path) -> tune.Tuner:
    cfg = driver.ss.cfg
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_StudySearch(driver), num_samples=-1,
            max_concurrent_trials=cfg.concurrency, reuse_actors=True,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(path.parent), verbose=0, log_to_file=False,
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def _fit(driver: _Driver, tuner: tune.Tuner, path: Path) -> None:
    """``tuner.fit()``; a KeyboardInterrupt when Tune stopped on a SIGINT (Tune catches it)."""
    from autohybrid.search.run import console

    driver.finished = False
    tuner.fit()
    searcher = driver.searcher
    if searcher is not None and (searcher._live or (searcher._asked and not driver.finished)):
        console.print(f"interrupted: rerun with --resume to continue the Ray Tune experiment "
                      f"in {path}")
        raise KeyboardInterrupt


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


# -- driver side ----------------------------------------------------------------------------
class _Settled(Exception):
    """A trial decided in the driver (infeasible or screened): told without a Ray trial."""

    def __init__(self, state: TrialState, values):
        self.state, self.values = state, values


class _Deferred(Exception):
    """Raised where SearchStudy.objective would score: the allocation goes to a Ray worker."""


class _ScoreOnRay:
    """The driver's stand-in evaluator: scoring happens on Ray, not here."""

    def score(self, layers):
        raise _Deferred


@dataclass
class _RayStudy(SearchStudy):
    """SearchStudy whose recovery of dead trials spares ``keep`` (the Optuna trial numbers a
    restored Tune experiment runs again); ``keep=None`` defers recovery altogether."""

    keep: set[int] | None = None

    def _recover_dead_local_trials(self) -> None:
        if self.keep is None:
            return
        if not self.keep:
            return super()._recover_dead_local_trials()
        # as SearchStudy._recover_dead_local_trials, minus the kept trials
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (t.number in self.keep or t.user_attrs.get("host") != host
                    or pid_alive(t.user_attrs.get("pid", -1))):
                continue
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            _requeue(self.study, t)


class _Driver:
    """What the searcher needs from this run_ray call: the study, the target, the progress."""

    def __init__(self, ss: _RayStudy):
        self.ss, self.target = ss, ss.cfg.trials
        self.cap = 5 * self.target + 20  # as SearchStudy.run: stop when nearly all fail
        self.quality, self.cost_key = ss.cfg.quality, f"{ss.cfg.metric}_fraction"
        self.on_trial: Callable[[FrozenTrial, optuna.Study], None] | None = None
        self.searcher: _StudySearch | None = None
        self.finished = False
        self._counted = (-1e9, 0, 0)

    def counts(self, fresh: bool = False) -> tuple[int, int]:
        """(evaluated trials within the budget, all trials) of the study: what ``--trials``
        counts, as in SearchStudy.run; re-read at most once a second."""
        at, feasible, total = self._counted
        if fresh or time.monotonic() - at > 1.0:
            trials = self.ss.study.get_trials(deepcopy=False)
            feasible = sum(map(within_budget, trials))
            self._counted = (time.monotonic(), feasible, len(trials))
            total = len(trials)
        return feasible, total

    def tell(self, number: int, state: TrialState, values, attrs: dict | None = None) -> None:
        """Write ``attrs`` onto trial ``number``, then finish it."""
        study, storage = self.ss.study, self.ss.storage
        trial = self._trial(number)
        if trial.state == TrialState.RUNNING:
            for k, v in (attrs or {}).items():
                storage.set_trial_user_attr(trial._trial_id, k, v)
            study.tell(number, values, state=state)
        elif trial.state == TrialState.FAIL and state == TrialState.COMPLETE:
            # an errored Tune trial rerun by --resume: its trial was failed, record a new one
            study.add_trial(optuna.trial.create_trial(
                state=state, values=values, params=trial.params,
                distributions=trial.distributions,
                user_attrs={**trial.user_attrs, **(attrs or {}), "retry_of": number},
                system_attrs={k: v for k, v in trial.system_attrs.items()
                              if k.startswith("constraints")},  # Trial.set_constraint's
            ))
        else:
            return
        self._counted = (-1e9, 0, 0)
        if state == TrialState.COMPLETE:
            self.ss.refit_surrogate()
        if self.on_trial:
            self.on_trial(self._trial(number), study)

    def _trial(self, number: int) -> FrozenTrial:
        return next(t for t in self.ss.study.get_trials(deepcopy=False) if t.number == number)


class _StudySearch(OptunaSearch):
    """OptunaSearch on the SearchStudy's study, with its objective as the define-by-run
    space, user attrs written before each tell, and the stop rule of SearchStudy.run.

    Pickles (tuner.pkl) and saves (searcher checkpoints) only the Tune -> Optuna trial map;
    everything else comes from the run_ray call in progress when it is restored."""

    def __init__(self, driver: _Driver):
        self._attach(driver)
        super().__init__(space=self._define, metric=[driver.quality, driver.cost_key],
                         mode=["min", "min"])
        self._numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._live: set[str] = set()  # suggested, not yet complete
        self._asked = False

    def _attach(self, driver: _Driver) -> None:
        self._driver, self._space = driver, self._define
        self._ot_study, self._ot_trials = driver.ss.study, {}
        driver.searcher = self

    def _setup_study(self, mode) -> None:  # the study exists already: SearchStudy.open
        self._ot_study = self._driver.ss.study

    def __getstate__(self) -> dict:
        drop = ("_driver", "_space", "_ot_study", "_ot_trials", "_sampler", "_storage")
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: dict) -> None:
        if _ACTIVE is None:
            raise RuntimeError("a Ray search can only be restored inside run_ray")
        self.__dict__.update(state)
        self._attach(_ACTIVE)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"numbers": self._numbers, "live": self._live,
                         "completed": self._completed_trials}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self._numbers, self._live = state["numbers"], state["live"]
        self._completed_trials = state["completed"]
        ss = self._driver.ss
        ss.keep = {self._numbers[t] for t in self._live}
        ss._recover_dead_local_trials()

    # -- trials -----------------------------------------------------------------------------
    def _define(self, trial) -> dict:
        try:
            values = self._driver.ss.objective(trial)
        except _Deferred:
            return {ALLOCATION: trial.user_attrs["allocation"],
                    FRACTION: trial.user_attrs[self._driver.cost_key]}
        except optuna.TrialPruned:
            raise _Settled(TrialState.PRUNED, None) from None
        raise _Settled(TrialState.COMPLETE, values)  # infeasible: never evaluated

    def suggest(self, trial_id: str) -> dict | str | None:
        d = self._driver
        self._asked = True
        while True:
            feasible, total = d.counts()
            if feasible >= d.target or total >= d.cap:
                d.finished = True
                return Searcher.FINISHED
            if feasible + len(self._live) >= d.target:
                return None  # the running trials may reach the total
            d.ss.enqueue_local_move()  # the last trials: moves around the best one so far
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Heartbeat of storage")  # ask() on RDB
                    warnings.filterwarnings("ignore", "Define-by-run function")  # repair: ok
                    config = super().suggest(trial_id)
            except _Settled as s:
                d.tell(self._ot_trials.pop(trial_id).number, s.state, s.values)
                continue
            trial = self._ot_trials.pop(trial_id)
            trial.set_user_attr("ray_trial", trial_id)
            self._numbers[trial_id] = trial.number
            self._live.add(trial_id)
            return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        number = self._numbers.get(trial_id)
        if number is None:
            return
        self._live.discard(trial_id)
        self._completed_trials.add(trial_id)
        result = result or {}
        d = self._driver
        if result.get("fail_reason"):
            d.tell(number, TrialState.FAIL, None, {"fail_reason": result["fail_reason"]})
        elif not error and d.quality in result:
            scores = {k.removeprefix("scores/"): v for k, v in result.items()
                      if k.startswith("scores/")}
            d.tell(number, TrialState.COMPLETE, [result[d.quality], result[d.cost_key]],
                   scores)
        else:
            d.tell(number, TrialState.FAIL, None,
                   {"fail_reason": "the Ray trial failed (see its error in ray_results)"})


# -- worker side ----------------------------------------------------------------------------
_EVALUATORS: dict[str, Evaluator] = {}  # per worker process: object ref -> evaluator


def _worker_evaluator(ref: ray.ObjectRef) -> Evaluator:
    """The evaluator of this run, fetched once per worker (its layer cache then persists)."""
    key = ref.hex()
    if key not in _EVALUATORS:
        _EVALUATORS.clear()
        _EVALUATORS[key] = ray.get(ref)
    return _EVALUATORS[key]


def _trainable(config: dict, shared: dict) -> None:
    """Score one allocation; report its quality, its cost and every score."""
    quality, cost = shared["quality"], shared["cost"]
    evaluator = _worker_evaluator(shared["evaluator"])
    try:
        scores = evaluator.score(_load(config[ALLOCATION]))
    except NumericalError as e:  # a failed trial, not a crashed one: no retry
        tune.report({quality: float("nan"), cost: config[FRACTION], "fail_reason": str(e)})
        return
    tune.report({quality: scores[quality], cost: config[FRACTION], "scores": scores})
