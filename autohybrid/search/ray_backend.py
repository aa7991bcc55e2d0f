"""``--backend ray``: the study's trials scored as Ray Tune trials, on the same Optuna study.

How the pieces fit:

- The study is the SearchStudy's own, opened exactly as on the Optuna path (same storage and
  name, settings check, warm starts enqueued once, dead trials recovered).
- ``StudySearcher`` is a Ray Tune ``Searcher`` over the study's ask / prepare / record
  (``search.study``): ``suggest`` asks a trial and prepares it in the driver (decode + repair
  to the budget, or a warm start's fixed allocation; the cost attrs and the budget
  constraint; the surrogate screen: cheap, and screening compares with the completed
  trials). Settled trials (over the budget, screened) are recorded at once and never reach
  Ray; the others go to a worker as ``{allocation, fraction}``. ``on_trial_complete`` records
  what the worker reported. The stop rule is ``SearchStudy.finished``, the Optuna path's.
- The Ray trainable scores the allocation on a worker. The evaluator (model, calibration
  tensors, reference logits) goes to the object store once (``ray.put``, handed over with
  ``tune.with_parameters``) and each worker keeps it, with its cache of compressed layers,
  across the trials it runs (``reuse_actors``).
- The searcher pickles (tuner.pkl) with its SearchStudy, which reopens its study from the
  storage when unpickled, and checkpoints the Tune -> Optuna trial map. So ``--resume``
  restores the interrupted Tune experiment in ``OUT/ray_results/STUDY`` with nothing but
  Ray's own restore: the trials it had running run again under their own Optuna trials
  (spared by the recovery of dead trials until then), at the concurrency it was started
  with; if the total is still not reached, a fresh experiment continues the study. Without
  ``--resume`` a fresh experiment replaces the old one, and trials the dead driver had
  running are failed and enqueued again, as on the Optuna path.
- A killed trial process is retried by Ray (``max_failures=2``).
- The selection stage after the search (``select_on_ray``) runs on Ray tasks too: each is a
  worker of the stage's claim protocol on the stage study, the rungs decided by the same
  synchronous pruner as on the Optuna path (the same survivors, winner and weights).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import shutil
import socket
import threading
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.search import Searcher

from autohybrid.config import SearchConfig
from autohybrid.exceptions import ConfigError
from autohybrid.progress import console
from autohybrid.search.console import TrialProgress
from autohybrid.search.objective import Evaluator, NumericalError
from autohybrid.search.params import ParamSpace
from autohybrid.search.study import SearchStudy, Settled, _dump, _load
from autohybrid.search.surrogate import Surrogate

__all__ = ["run_ray", "StudySearcher"]

# Quiet and offline: no usage stats, no dashboard, no Tune tables or result loggers.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0",
             "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
ALLOCATION, FRACTION = "allocation", "fraction"  # the config keys a trainable gets
RESULTS = "ray_results"
TARGET_KEY = "ray:trials"  # study user attr: the total of the run restoring an experiment


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
    budget (settled ones, recorded without a Ray trial, do not count)."""
    path = (Path(cfg.out) / RESULTS / re.sub(r"[^\w.-]+", "_", study_name)).resolve()
    restore = cfg.resume and tune.Tuner.can_restore(str(path))
    ss = SearchStudy(cfg, storage, study_name, ps, None, surrogate, identity)
    # a restored experiment reruns the trials it had running: the restored searcher
    # recovers the others once it knows which
    ss.open(warm, recover=not restore)
    started = _init_ray(cfg)
    try:
        shared = {"evaluator": ray.put(evaluator), "quality": cfg.quality,
                  "cost": f"{cfg.metric}_fraction"}
        trainable = tune.with_parameters(_trainable, shared=shared)
        with TrialProgress(cfg) as progress, _Watch(ss, progress):
            if cfg.resume and not restore:
                console.print(f"no Ray Tune experiment to resume in {path}; starting one")
            if restore:
                console.print(f"resuming the Ray Tune experiment {path}")
                # the restored searcher was pickled with the old run's settings: it reads
                # this run's total from the study
                ss.study.set_user_attr(TARGET_KEY, cfg.trials)
                _fit(ss, tune.Tuner.restore(str(path), trainable, resume_errored=True), path)
                ss.recover()
            if not ss.finished():
                shutil.rmtree(path, ignore_errors=True)
                _fit(ss, _new_tuner(ss, trainable, path), path)
    finally:
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


def _new_tuner(ss: SearchStudy, trainable, path: Path) -> tune.Tuner:
    cfg = ss.cfg
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=StudySearcher(ss), num_samples=-1,
            max_concurrent_trials=cfg.concurrency, reuse_actors=True,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(path.parent), verbose=0, log_to_file=False,
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def _fit(ss: SearchStudy, tuner: tune.Tuner, path: Path) -> None:
    """``tuner.fit()``; a KeyboardInterrupt when Tune ended before the study's stop rule
    (Tune catches the SIGINT and returns)."""
    tuner.fit()
    if not ss.finished():
        console.print(f"interrupted: rerun with --resume to continue the Ray Tune experiment "
                      f"in {path}")
        raise KeyboardInterrupt


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


class _Watch:
    """Shows the study's trials on ``progress`` as they finish, read from the storage every
    second: a restored experiment records through its own unpickled searcher, so the
    driver's display cannot wait to be called."""

    def __init__(self, ss: SearchStudy, progress: TrialProgress, every: float = 1.0):
        self.ss, self.progress, self.every = ss, progress, every
        self._stop = threading.Event()

    def __enter__(self) -> _Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.progress.refresh(self.ss.study)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.progress.refresh(self.ss.study)


# -- driver side ----------------------------------------------------------------------------
class StudySearcher(Searcher):
    """Ray Tune's ``Searcher`` over ``SearchStudy``: ``suggest`` = ask + prepare,
    ``on_trial_complete`` = record. Pickles with its SearchStudy (which reopens the study
    from its storage); ``save`` / ``restore`` keep the Tune -> Optuna trial map."""

    def __init__(self, ss: SearchStudy):
        super().__init__(metric=ss.cfg.quality, mode="min")
        self.ss = ss
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.live: set[str] = set()  # suggested, not yet complete

    def suggest(self, trial_id: str) -> dict | str | None:
        ss = self.ss
        while True:
            if ss.finished():
                return Searcher.FINISHED
            if ss.finished(running=len(self.live)):
                return None  # the running trials may reach the total
            trial = ss.ask()
            prepared = ss.prepare(trial)
            if isinstance(prepared, Settled):
                ss.settle(prepared)
                continue
            trial.set_user_attr("ray_trial", trial_id)
            self.numbers[trial_id] = prepared.number
            self.live.add(trial_id)
            return {ALLOCATION: _dump(prepared.layers), FRACTION: prepared.fraction}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        number = self.numbers.get(trial_id)
        if number is None:
            return
        self.live.discard(trial_id)
        result = result or {}
        if result.get("fail_reason"):
            self.ss.record(number, fail_reason=result["fail_reason"])
        elif not error and self.ss.cfg.quality in result:
            scores = {k.removeprefix("scores/"): v for k, v in result.items()
                      if k.startswith("scores/")}
            self.ss.record(number, scores)
        else:
            self.ss.record(number, fail_reason="the Ray trial failed (see its error in "
                                               "ray_results)")

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        target = self.ss.study.user_attrs.get(TARGET_KEY)
        if target:
            self.ss.cfg = dataclasses.replace(self.ss.cfg, trials=int(target))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"numbers": self.numbers, "live": self.live}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.numbers, self.live = state["numbers"], state["live"]
        # the trials it had running run again: recover only the other dead ones
        self.ss.recover(keep=frozenset(self.numbers[t] for t in self.live))


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


# -- the selection stage on Ray -------------------------------------------------------------
def select_on_ray(sel) -> int:
    """The selection stage (``search.select``) done by Ray tasks; returns the winner.

    Each task is one more worker of the stage's own protocol, exactly as another
    ``autohybrid search`` process on the same study would be: it claims a candidate's work at
    a rung in the stage study, fine-tunes it (continuing from its checkpoint under ``--out``),
    reports its validation top-1, waits at the rung for the others, and the rung is decided
    once by the study's pruner, ``RungPruner``: synchronous successive halving, so the
    survivors are the top 1/eta of the whole rung whatever order the tasks finish in.
    ``min(--concurrency, candidates)`` tasks of one CPU each (and one GPU each where
    ``--device`` asks for one, or ``auto`` finds GPUs in the Ray cluster). The tasks need the
    storage and ``--out`` where they run: any storage on one machine, PostgreSQL and a shared
    folder across machines.

    Not Ray Tune's ``ASHAScheduler``: it promotes a trial against the values reported at its
    rung *so far*, so which candidates survive, and the winner, depend on the order the
    fine-tunes finish in, and a killed stage rerun need not end as the uninterrupted one.

    A task killed mid-rung is retried by Ray; its claims are taken over (the dead process's
    pid) and its candidate's fine-tune continues from the last checkpoint. The driver shows
    each report as it lands in the study."""
    cfg, pool = sel.cfg, sel.pool
    started = _init_ray(cfg)
    try:
        setup = dataclasses.replace(sel.setup, dense_inputs=None)  # each task keeps its own
        task = _stage_worker.options(num_cpus=1, num_gpus=_stage_gpus(cfg), max_retries=2)
        shared = ray.put(setup)
        n = min(max(1, cfg.concurrency), len(pool))
        console.print(f"  {n} Ray task(s) share the stage")
        pending = [task.remote(shared, pool, sel.ladder) for _ in range(n)]
        shown: set = set()
        while pending:
            done, pending = ray.wait(pending, timeout=1.0)
            _show_stage(sel.stage, shown)
            try:
                ray.get(done)
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
        _show_stage(sel.stage, shown)
    finally:
        if started:
            ray.shutdown()
    return sel.winner()


def _stage_gpus(cfg: SearchConfig) -> float:
    """GPUs per stage task: one where ``--device`` names CUDA, or ``auto`` and the Ray
    cluster has a GPU; none otherwise."""
    if cfg.device == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if cfg.device.startswith("cuda"):
        if ray.cluster_resources().get("GPU", 0) < 1:
            raise ConfigError(f"--device {cfg.device}: the Ray cluster has no GPU; use "
                              "--device cpu (or auto)")
        return 1.0
    return 0.0


def _show_stage(stage, shown: set) -> None:
    """Print the stage study's reports and prunings not shown yet."""
    from optuna.trial import TrialState

    for c, t in sorted(stage.trials().items()):
        for step, value in sorted(t.intermediate_values.items()):
            if (c, step) not in shown:
                shown.add((c, step))
                who = t.user_attrs.get(f"worker_{step}", "?")
                console.print(f"  trial {c}: validation top-1 {value:.2f} % after {step} "
                              f"step(s) ({who})")
        if t.state == TrialState.PRUNED and (c, "pruned") not in shown:
            shown.add((c, "pruned"))
            console.print(f"  trial {c}: pruned at {t.last_step} step(s)")


@ray.remote
def _stage_worker(setup, pool: list, lad) -> int:
    """One worker of the selection stage on a Ray process (``select_on_ray``)."""
    from autohybrid.search.select import Selection

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sel = Selection(setup, pool, lad)
    winner = sel.run()
    sel.export_winner(winner)
    return winner
