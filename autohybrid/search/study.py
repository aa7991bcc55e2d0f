"""The Optuna study: two objectives (quality on calibration, cost fraction), a hard budget
constraint, warm starts, surrogate screening, resume and many workers on one storage.

Trials go through it as ask / tell (Optuna's ``Study.ask()`` / ``Study.tell()``):
``SearchStudy.ask()`` opens the next trial, ``prepare(trial)`` decides its allocation (or
settles it: over the budget, screened by the surrogate), whoever scores it (``run`` here, a
Ray trainable in ``search.ray_backend``) hands the scores to ``record``. ``finished`` is the one
stop rule and ``recover`` the one recovery of dead trials, for every backend.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autohybrid.config import SearchConfig
from autohybrid.exceptions import ConfigError
from autohybrid.io import pid_alive
from autohybrid.search.local import apply_move, moves
from autohybrid.search.objective import Evaluator, NumericalError
from autohybrid.search.params import ParamSpace
from autohybrid.search.surrogate import Surrogate
from autohybrid.spec import LayerSpec

__all__ = ["SearchStudy", "Ready", "Settled", "TrialSeededSampler", "pareto_front",
           "trial_layers", "make_sampler", "within_budget", "origin", "STUDY_KEYS"]

STUDY_KEYS = ("fingerprint", "budget", "metric", "space", "quality", "groups", "calib", "seed",
              "fit", "latency", "latency_margin")
SCREEN_AFTER = 8
SCREEN_FACTOR = 2.0
MAX_SCREENED_IN_A_ROW = 3


def make_sampler(cfg: SearchConfig, storage: optuna.storages.BaseStorage
                 ) -> TrialSeededSampler:
    """The samplers read the budget constraint each trial sets (``Trial.set_constraint``)."""

    def build(seed: int) -> optuna.samplers.BaseSampler:
        if cfg.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
        if cfg.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)

    return TrialSeededSampler(build, cfg.seed, storage)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples each trial with a sampler of its own, seeded with (seed, the trial's index).

    Optuna's samplers draw from one random stream per process. A study continued by a new
    process (the rerun after a crash) starts that stream over, so it neither proposes what the
    uninterrupted run would have nor avoids redrawing its own first trials, and workers sharing
    a study with one seed draw alike. Seeded per trial, the draws of a trial depend only on the
    seed, its index and the study's history (NSGA-II keeps its generations in the storage): a
    rerun continues exactly as if never stopped, and workers draw differently because their
    trials have different indices. The index counts the trials before this one, less those
    that rerun a dead trial: a rerun keeps the index of the trial it repeats (a system attr,
    copied with the others), so it draws what that trial drew, and the trials after a
    recovered crash keep the indices they would have had.
    """

    INDEX_KEY = "autohybrid:draw_index"

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int,
                 storage: optuna.storages.BaseStorage):
        self._build, self._seed, self._storage = build, seed, storage
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}  # trial number -> sampler

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            index = trial.system_attrs.get(self.INDEX_KEY)
            if index is None:
                earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
                index = sum(not _is_retry(t) for t in earlier)
                self._storage.set_trial_system_attr(
                    trial_id(self._storage, study.study_name, trial.number), self.INDEX_KEY,
                    index)
            seed = np.random.SeedSequence([self._seed, index]).generate_state(1)[0]
            self._samplers[trial.number] = self._build(int(seed))
        return self._samplers[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(study, trial).sample_independent(study, trial, param_name,
                                                          param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number``, by the storage's public lookups."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def _is_retry(t: FrozenTrial) -> bool:
    """A trial that reruns a dead one (ours, or Optuna's heartbeat retry)."""
    return "retry_of" in t.user_attrs or "failed_trial" in t.system_attrs


def fit_meta(cfg: SearchConfig) -> dict:
    """How the study fits layers: what an allocation file records under ``meta.fit``."""
    if cfg.fit != "data":
        return {"mode": "weights"}
    return {"mode": "data", "damp": cfg.damp, "saliency": cfg.saliency, "sequential": True}


def trial_layers(trial: FrozenTrial) -> dict[str, LayerSpec]:
    return _load(trial.user_attrs["allocation"])


def within_budget(t: FrozenTrial) -> bool:
    """An evaluated trial within the budget (over-budget ones are pruned, unevaluated, with a
    positive constraint): what ``--trials`` counts on either backend, and fronts are made of."""
    return t.state == TrialState.COMPLETE and t.user_attrs.get("constraint", 1) <= 0


ORIGIN_START, ORIGIN_MOVE = "warm start ", "local move from trial "


def origin(t) -> str:
    """Where a trial came from: a warm start, a local move (``search.local``), the sampler."""
    if t.user_attrs.get("warm_start"):
        return f"{ORIGIN_START}{t.user_attrs['warm_start']}"
    if "local_of" in t.user_attrs:
        return f"{ORIGIN_MOVE}{t.user_attrs['local_of']}: {t.user_attrs['local_move']}"
    return "sampled"


def pareto_front(trials: list[FrozenTrial], budget: float | None = None) -> list[FrozenTrial]:
    """Complete, within-budget trials not dominated in (quality, cost), best quality first."""
    ok = [t for t in trials if within_budget(t) and t.values
          and (budget is None or t.values[1] <= budget + 1e-12)]
    front = []
    for t in sorted(ok, key=lambda t: (t.values[1], t.values[0], t.number)):
        if not front or t.values[0] < front[-1].values[0]:
            front.append(t)
    return sorted(front, key=lambda t: (t.values[0], t.number))


@dataclass
class Ready:
    """A prepared trial to score: its allocation and cost fraction."""

    number: int
    layers: dict[str, LayerSpec]
    fraction: float


@dataclass
class Settled:
    """A prepared trial decided without scoring: screened by the surrogate (told PRUNED), or
    over the budget: told COMPLETE with its exact cost and the surrogate's predicted quality
    (user attr ``quality_predicted``), never evaluated, its constraint positive. The sampler
    sees it (NSGA-II ranks an infeasible trial behind every feasible one, by how far over
    the budget it is), so its generations fill with trials and breed away from the
    infeasible region; told PRUNED instead, it would be invisible to the sampler, which
    then draws over-budget allocations again and again (the demo: 68 over the budget for 22
    evaluated, against 41 for 40). Without a surrogate it is told PRUNED."""

    number: int
    reason: str
    values: tuple[float, float] | None = None


@dataclass
class SearchStudy:
    """One search's Optuna study, as ask / prepare / record (see the module docstring)."""

    cfg: SearchConfig
    storage: optuna.storages.BaseStorage
    study_name: str
    ps: ParamSpace
    evaluator: Evaluator | None
    surrogate: Surrogate | None
    identity: dict
    on_trial: Callable[[FrozenTrial, optuna.Study], None] | None = None
    study: optuna.Study | None = None
    leader: bool = False
    _screened_in_a_row: int = field(default=0, repr=False)
    _stop: bool = field(default=False, repr=False)

    # -- pickling (a Ray searcher carries the study to a restored experiment) ----------------
    def __getstate__(self) -> dict:
        drop = ("study", "evaluator", "on_trial")
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, evaluator=None, on_trial=None)
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                       sampler=make_sampler(self.cfg, self.storage))

    # -- study ----------------------------------------------------------------------------
    def attrs(self) -> dict:
        return {
            "fingerprint": self.ps.inv.fingerprint, "budget": self.cfg.budget,
            "metric": self.cfg.metric, "space": self.ps.space.digest,
            "quality": self.cfg.quality, "groups": [list(g.layers) for g in self.ps.groups],
            "calib": self.cfg.calib, "seed": self.cfg.seed, "fit": fit_meta(self.cfg),
            "data": self.cfg.data,
            "latency": self.ps.latency.key if self.ps.latency is not None else None,
            "latency_margin": self.ps.latency.margin if self.ps.latency is not None else None,
        }

    def open(self, warm: dict[str, dict[str, LayerSpec]] | None = None,
             recover: bool = True) -> optuna.Study:
        """Create or join the study; the leader stores the settings and enqueues the warm
        starts, a joiner checks its settings against them. ``recover=False`` leaves dead
        trials alone for now (a restored Ray experiment reruns some of them itself)."""
        sampler = make_sampler(self.cfg, self.storage)
        try:
            study = optuna.create_study(
                storage=self.storage, study_name=self.study_name, sampler=sampler,
                directions=["minimize", "minimize"],
            )
            self.leader = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                      sampler=sampler)
        mine = self.attrs()
        if self.leader:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([self.cfg.quality, f"{self.cfg.metric}_fraction"])
            for k, v in mine.items():
                study.set_user_attr(k, v)
            study.set_user_attr("model", self.identity)
            # the four classic warm starts always; the others up to two thirds of the
            # trials before the local moves, the sampler keeping the rest. In the 27
            # searched cells of RESULTS_datafit.md the model returned was a warm start (17)
            # or a local move (10), never a sampled trial, and half of the trials (the
            # share before) left out a family's uniform start the cut space returned
            room = max(4, 2 * (self.cfg.trials - self.local_trials()) // 3)
            for name, layers in list((warm or {}).items())[:room]:
                study.enqueue_trial(self.ps.params_for(layers), user_attrs={
                    "warm_start": name, "allocation": _dump(layers)})
        else:
            theirs = {k: study.user_attrs.get(k) for k in STUDY_KEYS}
            diff = [k for k in STUDY_KEYS if theirs[k] is not None and theirs[k] != mine[k]]
            if diff:
                k = diff[0]
                raise ConfigError(
                    f"study {self.study_name!r} was started with {k}={_short(theirs[k])}, this "
                    f"run has {k}={_short(mine[k])}; use the same settings, or another "
                    "--study-name / --out"
                )
        self.study = study
        if recover:
            self.recover()
        return study

    def recover(self, keep: frozenset[int] = frozenset()) -> None:
        """RUNNING trials started on this host by a process that no longer exists (SIGKILL),
        except those numbered in ``keep``: fail them and enqueue their parameters again, at
        once, without waiting for the heartbeat grace period (journal storages have no
        heartbeat at all)."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (t.number in keep or t.user_attrs.get("host") != host
                    or pid_alive(t.user_attrs.get("pid", -1))):
                continue
            try:
                self.storage.set_trial_state_values(self._id(t.number), TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker recovered it first
            _requeue(self.study, t)

    def completed(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def feasible(self) -> list[FrozenTrial]:
        """Evaluated trials within the budget: what ``--trials`` counts."""
        return [t for t in self.completed() if within_budget(t)]

    def counts(self) -> tuple[int, int]:
        """(evaluated trials within the budget, all trials)."""
        trials = self.study.get_trials(deepcopy=False)
        return sum(map(within_budget, trials)), len(trials)

    def finished(self, running: int = 0) -> bool:
        """The stop rule of every backend: ``cfg.trials`` evaluated within the budget, or so
        many trials that nearly all of them must be failing (5x the total + 20). With
        ``running`` trials in flight that may still reach the total, it is reached early."""
        feasible, total = self.counts()
        return feasible + running >= self.cfg.trials or total >= 5 * self.cfg.trials + 20

    # -- one trial: ask, prepare, record ----------------------------------------------------
    def ask(self) -> optuna.Trial:
        """The next trial: a local move around the best one once the sampled trials are done
        (enqueued first), else a warm start, a rerun of a dead trial or a sampled one."""
        self.enqueue_local_move()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Heartbeat of storage")  # ask() on an RDB
            return self.study.ask()

    def prepare(self, trial: optuna.Trial) -> Ready | Settled:
        """Decide the trial's allocation and its cost (user attrs, the budget constraint).
        Cheap and driver-side; a trial that needs no scoring comes back ``Settled``."""
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = self.ps.suggest(trial)
        fixed = trial.user_attrs.get("allocation")
        if fixed is not None:
            layers, scale = _load(fixed), 1.0
        else:
            layers, scale = self.ps.repair(params, self.cfg.budget)
            trial.set_user_attr("allocation", _dump(layers))
            trial.set_user_attr("scale", scale)
        c = self.ps.cost(layers)
        frac = c.fraction(self.cfg.metric)
        trial.set_user_attr("params_fraction", c.params_fraction)
        trial.set_user_attr("macs_fraction", c.macs_fraction)
        if c.latency is not None:
            trial.set_user_attr("latency_fraction", c.latency_fraction)
        trial.set_user_attr("constraint", frac - self.cfg.budget)
        trial.set_constraint("budget", frac - self.cfg.budget)
        if frac > self.cfg.budget:  # cannot be made to fit: infeasible, never evaluated
            trial.set_user_attr("infeasible", True)
            if self.surrogate is None:
                return Settled(trial.number, "over the budget")
            predicted = float(self.surrogate.predict(layers, frac)[1])
            trial.set_user_attr("predicted", predicted)
            trial.set_user_attr("quality_predicted", True)
            return Settled(trial.number, "over the budget", (predicted, frac))
        if self.surrogate is not None:
            additive, predicted = self.surrogate.predict(layers, frac)
            trial.set_user_attr("predicted_additive", additive)
            trial.set_user_attr("predicted", predicted)
            if fixed is None and self._screen(predicted, frac):
                trial.set_user_attr("screened", True)
                return Settled(trial.number, "surrogate predicts a dominated allocation")
        self._screened_in_a_row = 0
        return Ready(trial.number, layers, frac)

    def settle(self, settled: Settled) -> None:
        """Tell a trial ``prepare`` settled without scoring (see ``Settled``)."""
        self.record(settled.number, values=settled.values)

    def record(self, number: int, scores: dict | None = None, fail_reason: str | None = None,
               attrs: dict | None = None, values: tuple[float, float] | None = None) -> None:
        """Tell trial ``number``: COMPLETE with ``scores`` (every score goes into its user
        attrs) or with a settled trial's ``values``, FAIL with ``fail_reason``, or PRUNED
        when none of them (a screened ``Settled`` trial).
        A rerun of a trial failed meanwhile (an errored Ray trial restored by ``--resume``)
        is recorded as a new trial (``retry_of``)."""
        trial = self._frozen(number)
        attrs = {**(attrs or {}), **(scores or {})}
        if fail_reason is not None:
            attrs["fail_reason"] = fail_reason
        state = (TrialState.FAIL if fail_reason is not None
                 else TrialState.COMPLETE if scores is not None or values is not None
                 else TrialState.PRUNED)
        if state != TrialState.COMPLETE:
            values = None
        elif scores is not None:
            values = [scores[self.cfg.quality], trial.user_attrs[f"{self.cfg.metric}_fraction"]]
        else:
            values = list(values)
        if trial.state == TrialState.RUNNING:
            tid = self._id(number)
            for k, v in attrs.items():
                self.storage.set_trial_user_attr(tid, k, v)
            self.study.tell(number, values, state=state)
        elif trial.state == TrialState.FAIL and state == TrialState.COMPLETE:
            self.study.add_trial(optuna.trial.create_trial(
                state=state, values=values, params=trial.params,
                distributions=trial.distributions,
                user_attrs={**trial.user_attrs, **attrs, "retry_of": number},
                system_attrs={k: v for k, v in trial.system_attrs.items()
                              if k.startswith("constraints")},  # Trial.set_constraint's
            ))
        else:
            return  # finished already (another worker recovered it)
        if state == TrialState.COMPLETE:
            self.refit_surrogate()
        if self.on_trial:
            self.on_trial(self._frozen(number), self.study)

    def _frozen(self, number: int) -> FrozenTrial:
        return self.study.get_trials(deepcopy=False)[number]

    def _id(self, number: int) -> int:
        return trial_id(self.storage, self.study_name, number)

    # -- local search ---------------------------------------------------------------------
    def local_trials(self) -> int:
        """How many of ``--trials`` go to local moves around the best trial (the last ones)."""
        if self.surrogate is None:
            return 0
        return min(self.cfg.trials - 1, round(self.cfg.local_search * self.cfg.trials))

    def enqueue_local_move(self) -> bool:
        """Once the sampled trials are done, enqueue the next local move (``search.local``)
        around the best feasible trial so far, unless a trial is already waiting.

        The move is the best predicted one not yet in the study, preferring layers that no
        move from this incumbent has touched (coordinate descent: each layer gets one try per
        incumbent before any gets a second). A move that measured no better than the trial
        it started from (same layer, method and ranks: ``Move.shape``) is not tried again
        from a later incumbent: incumbents differ in a few layers, so it would most likely
        fail again. A rerun after a crash recomputes the same next move from the stored
        trials, so nothing is lost or repeated."""
        n_local = self.local_trials()
        if n_local <= 0:  # off: nothing to read from the storage
            return False
        done = self.feasible()
        if not done or not self.cfg.trials - n_local <= len(done) < self.cfg.trials:
            return False
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        best = min(done, key=lambda t: (t.values[0], t.number))
        incumbent = trial_layers(best)
        seen = {t.user_attrs.get("allocation") for t in trials}
        touched = {t.user_attrs.get("local_layer") for t in trials
                   if t.user_attrs.get("local_of") == best.number}
        value = {t.number: t.values[0] for t in done}
        failed = {t.user_attrs["local_shape"] for t in trials if "local_shape" in t.user_attrs
                  and t.state.is_finished() and not value.get(t.number, float("inf"))
                  < value.get(t.user_attrs["local_of"], float("inf"))}
        fresh = [(m, dumped) for m in moves(self.ps, incumbent, self.cfg.budget, self.surrogate)
                 if m.shape not in failed
                 and (dumped := _dump(apply_move(incumbent, m))) not in seen]
        if not fresh:
            return False
        move, dumped = next(((m, d) for m, d in fresh if m.layer not in touched), fresh[0])
        layers = apply_move(incumbent, move)
        self.study.enqueue_trial(self.ps.params_for(layers), user_attrs={
            "allocation": dumped, "local_of": best.number, "local_layer": move.layer,
            "local_shape": move.shape, "local_move": move.label,
            "local_predicted": move.predicted})
        return True

    def _screen(self, predicted: float, frac: float) -> bool:
        if not self.cfg.screen or self._screened_in_a_row >= MAX_SCREENED_IN_A_ROW:
            return False
        done = self.feasible()
        if len(done) < SCREEN_AFTER:
            return False
        best = min((t.values[0] for t in done if t.values[1] <= frac + 1e-9), default=None)
        if best is None or predicted <= SCREEN_FACTOR * best + 1e-4:
            return False
        self._screened_in_a_row += 1
        return True

    def refit_surrogate(self) -> None:
        if self.surrogate is None:
            return
        rows = [(t.user_attrs["predicted_additive"], t.values[1], t.values[0])
                for t in self.feasible() if "predicted_additive" in t.user_attrs]
        if rows:
            p, c, m = (list(x) for x in zip(*rows))
            self.surrogate.fit(p, c, m)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        """Ask, prepare, score with ``self.evaluator``, record, until ``finished``. A trial
        interrupted here (Ctrl-C, an error) is failed and enqueued again before the
        exception goes on, so a rerun continues with it."""
        self.refit_surrogate()
        self._stop = False
        with _Heartbeat(self.storage) as heartbeat:
            while not self._stop and not self.finished():
                if isinstance(self.storage, optuna.storages.RDBStorage):
                    with warnings.catch_warnings():  # stable since Optuna 2.9, still marked
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(self.study)
                trial = self.ask()
                try:
                    heartbeat.beat(self._id(trial.number))
                    ready = self.prepare(trial)
                    if isinstance(ready, Settled):
                        self.settle(ready)
                        continue
                    try:
                        scores = self.evaluator.score(ready.layers)
                    except NumericalError as e:
                        self.record(trial.number, fail_reason=str(e))
                        continue
                    self.record(trial.number, scores)
                except BaseException:
                    self._abandon(trial.number)
                    raise
                finally:
                    heartbeat.beat(None)
        return self.study

    def wait_for_others(self, poll: float = 1.0) -> None:
        """After ``run``: wait until no trial of the study is RUNNING (other workers' last
        trials), so that every worker hands the same trials to the next stage. Trials of dead
        workers are failed meanwhile as in ``run`` (``recover`` for this host; the heartbeat
        for RDB storages)."""
        from autohybrid.progress import console

        shown = False
        while running := self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.recover()
            if isinstance(self.storage, optuna.storages.RDBStorage):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(self.study)
            if not shown:
                who = sorted({f"{t.user_attrs.get('host')}:{t.user_attrs.get('pid')}"
                              for t in running})
                console.print(f"waiting for {len(running)} trial(s) other workers are scoring "
                              f"({', '.join(who)})")
                shown = True
            time.sleep(poll)

    def stop(self) -> None:
        """End ``run`` after the trial in progress (as ``Study.stop`` ends ``optimize``)."""
        self._stop = True

    def _abandon(self, number: int) -> None:
        t = self._frozen(number)
        if t.state == TrialState.RUNNING:
            self.storage.set_trial_state_values(self._id(number), TrialState.FAIL)
            _requeue(self.study, t)


class _Heartbeat:
    """What ``Study.optimize`` does for RDB storages with a heartbeat, on the public storage
    API: the running trial's heartbeat every interval, so a worker on another host that dies
    mid-trial is failed (and retried) by the others after the grace period."""

    def __init__(self, storage: optuna.storages.BaseStorage):
        interval = (storage.get_heartbeat_interval()
                    if isinstance(storage, optuna.storages.RDBStorage) else None)
        self.storage, self.interval, self.current = storage, interval, None
        self._stop = threading.Event()

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def beat(self, tid: int | None) -> None:
        self.current = tid
        if tid is not None and self.interval:
            self.storage.record_heartbeat(tid)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.current is not None:
                try:
                    self.storage.record_heartbeat(self.current)
                except Exception:  # noqa: BLE001 - a missed beat only delays recovery
                    pass

    def __exit__(self, *exc) -> None:
        self._stop.set()


def _requeue(study: optuna.Study, t: FrozenTrial) -> None:
    """Enqueue dead trial ``t`` again: its parameters, its decided allocation, and its system
    attrs, as Optuna's own retry callback does. These hold its draw index (see
    ``TrialSeededSampler``) and its NSGA-II generation, which an enqueued trial never gets (it
    samples nothing): without it the rerun would not count towards its generation, and every
    later generation would shift by one trial."""
    attrs = {k: v for k, v in t.user_attrs.items()
             if k in ("warm_start", "allocation") or k.startswith("local_")}
    attrs["retry_of"] = t.number
    system = {k: v for k, v in t.system_attrs.items()
              if not k.startswith("constraints")}  # the rerun sets its own
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, user_attrs=attrs,
        system_attrs={**system,
                      "fixed_params": {**t.system_attrs.get("fixed_params", {}), **t.params}},
    ))


def _dump(layers: dict[str, LayerSpec]) -> str:
    return json.dumps({n: s.to_dict() for n, s in layers.items()}, sort_keys=True)


def _load(text: str) -> dict[str, LayerSpec]:
    return {n: LayerSpec.from_dict(d) for n, d in json.loads(text).items()}


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) < 60 else s[:57] + "..."
