"""Many workers on one study (PostgreSQL, journal file), a worker killed with SIGKILL, the Ray
backend with an interrupted and resumed Tune experiment, and storage URLs with passwords.

Workers are processes of their own (fresh interpreters: their own pids, storages and
connections; killable), on a tiny setup: CIFAR ResNet-20 with random weights, 32 random
images, the six convs of layer3 searched, no sensitivity table, no surrogate, no fine-tuning.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

import autohybrid as ah
from autohybrid.config import SearchConfig
from autohybrid.exceptions import ConfigError
from autohybrid.models import create_model
from autohybrid.search.objective import Evaluator
from autohybrid.search.params import ParamSpace, group_layers
from autohybrid.search.study import SearchStudy, pareto_front, trial_layers
from autohybrid.search.warm_start import uniform
from autohybrid.search_space import SearchSpace
from autohybrid.storage import get_storage, mask_url

REPO = Path(__file__).resolve().parents[2]
BUDGET = 0.6
SPACE = SearchSpace(
    name="tiny", include=["layer3.*"], methods={"conv": ["sparse", "tucker2", "lowrank+sparse"]},
    factorizations={"conv": "tucker2"}, rank_ratios=[0.5, 0.25], sparsities=[0.5, 0.9],
    hybrid_rank_ratios=[0.25], hybrid_sparsities=[0.9], refine=0,
)
IDENTITY = {"name": "cifar_resnet20"}
ATTRS = ("allocation", "params_fraction", "macs_fraction", "constraint", "top1", "kl", "loss",
         "agreement")


# -- the tiny setup, shared by the test process and the worker processes ----------------------
def build(out, storage: str | None, trials: int, slow: float = 0.0, **cfg_kwargs):
    """(cfg, storage, ps, evaluator, warm starts, inventory); the same in every process."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    inv = ah.inventory(model, (3, 32, 32))
    cfg = SearchConfig(model="cifar_resnet20", budget=BUDGET, trials=trials, population=4,
                       seed=0, calib=len(x), candidates=0, out=str(out), storage=storage,
                       **cfg_kwargs)
    ps = ParamSpace(SPACE, inv, group_layers(SPACE, inv, None, cfg.max_groups, 0), cfg.metric)
    ev = Evaluator(model, inv, x, y, bn_recal=False, batch_size=32)
    if slow:
        ev = _slowed(ev, slow)
    return cfg, get_storage(storage, out), ps, ev, {"uniform": uniform(ps, BUDGET)}, inv


def _slowed(evaluator: Evaluator, seconds: float) -> Evaluator:
    """Each score takes ``seconds`` longer, so workers overlap and can be caught mid-trial.
    A local class: cloudpickle ships it by value to Ray workers."""

    class Slow(Evaluator):
        def score(self, layers):
            time.sleep(seconds)
            return super().score(layers)

    evaluator.__class__ = Slow
    return evaluator


def worker(out: str, storage: str | None, trials: int, study: str = "s", slow: float = 0.0,
           ready: str | None = None, workers: int = 1) -> None:
    """One Optuna worker process: open the study, wait for the others (``ready``), run to
    the total; write the numbers of the trials it completed to OUT/report.json."""
    torch.set_num_threads(1)  # workers side by side on few cores
    t0 = time.time()
    cfg, storage_, ps, ev, warm, _ = build(out, storage, trials, slow)
    done: list[int] = []
    ss = SearchStudy(cfg, storage_, study, ps, ev, None, IDENTITY,
                     on_trial=lambda t, s: done.append(t.number)
                     if t.state == TrialState.COMPLETE else None)
    ss.open(warm)
    if ready:
        Path(ready, str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(os.listdir(ready)) < workers and time.time() < deadline:
            time.sleep(0.02)
    t1 = time.time()
    ss.run()
    report = {"pid": os.getpid(), "complete": done, "setup_s": round(t1 - t0, 1),
              "run_s": round(time.time() - t1, 1)}
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "report.json").write_text(json.dumps(report))


def spawn(**kwargs) -> multiprocessing.Process:
    """``worker(**kwargs)`` in a real separate process (its own pid, its own storage
    connections, killable). Spawned, not forked: a fork of this process (torch's thread pools,
    Ray's gRPC threads once a Ray test ran) can crash in the child."""
    proc = multiprocessing.get_context("spawn").Process(target=worker, kwargs=kwargs)
    proc.start()
    return proc


def finish(proc: multiprocessing.Process, out: Path, timeout: float = 150) -> dict:
    proc.join(timeout)
    assert proc.exitcode == 0, f"worker {proc.pid} ended with {proc.exitcode}"
    return json.loads((out / "report.json").read_text())


def run_workers(tmp_path: Path, n: int, storage: str, study: str, trials: int) -> list[dict]:
    # the schema first: workers creating the tables of an empty database at the same time
    # collide (UniqueViolation / "table studies already exists": get_storage does not retry)
    get_storage(storage, tmp_path)
    ready = tmp_path / "ready"
    ready.mkdir()
    outs = [tmp_path / f"w{i}" for i in range(n)]
    procs = [spawn(out=str(o), storage=storage, study=study, trials=trials, slow=0.3,
                   ready=str(ready), workers=n) for o in outs]
    try:
        return [finish(p, o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


# -- checks -----------------------------------------------------------------------------------
def brute_front(trials: list[FrozenTrial], budget: float) -> set[tuple[float, float]]:
    """Non-dominated (quality, cost) pairs among feasible complete trials, by pairs."""
    pts = {tuple(t.values) for t in trials if t.state == TrialState.COMPLETE
           and t.user_attrs.get("constraint", 1.0) <= 0 and t.values[1] <= budget + 1e-12}
    return {p for p in pts
            if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in pts)}


def check_shared_study(study: optuna.Study, reports: list[dict], trials: int) -> None:
    all_trials = study.get_trials()
    numbers = [t.number for t in all_trials]
    assert sorted(numbers) == list(range(len(all_trials)))  # every number once, no gap
    assert len({t._trial_id for t in all_trials}) == len(all_trials)
    assert not [t.number for t in all_trials if t.state in (TrialState.RUNNING,
                                                            TrialState.WAITING)]
    complete = {t.number for t in all_trials if t.state == TrialState.COMPLETE}
    # --trials counts feasible (evaluated) trials, not the infeasible ones recorded beside
    # them; each worker stops when, after one of its trials, it sees the total reached, and
    # trials the other workers were running then still finish: up to (workers - 1) above it
    feasible = [t for t in all_trials if t.state == TrialState.COMPLETE and check_complete(t)]
    assert trials <= len(feasible) <= trials + len(reports) - 1
    ran = [n for r in reports for n in r["complete"]]
    assert sorted(ran) == sorted(complete)  # nothing lost, nothing recorded twice
    pids = {t.user_attrs["pid"] for t in all_trials if t.state == TrialState.COMPLETE}
    assert pids <= {r["pid"] for r in reports} and len(pids) >= 2  # the workers shared it
    front = pareto_front(all_trials, BUDGET)
    assert front and {tuple(t.values) for t in front} == brute_front(all_trials, BUDGET)
    assert len(front) == len({tuple(t.values) for t in front})
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        check_complete(t)
    check_no_sentinels(all_trials)


def check_no_sentinels(trials: list[FrozenTrial]) -> None:
    """What optuna-dashboard plots is what was measured: every stored objective value is a
    real quality (a KL, well below 100) and a cost fraction in (0, 1]; trials that were not
    evaluated store none."""
    for t in trials:
        if t.values is None:
            assert t.state != TrialState.COMPLETE
            continue
        assert 0 <= t.values[0] < 100 and 0 < t.values[1] <= 1, (t.number, t.values)


def check_complete(t: FrozenTrial) -> bool:
    """Every evaluated trial is within the budget and carries every user attr; an infeasible
    one (parameters that cannot be repaired into the budget, as ``SearchStudy.prepare``
    settles them) is never evaluated: told COMPLETE with its exact cost and the surrogate's
    predicted quality (flagged), or PRUNED with no values when there is no surrogate.
    True when evaluated."""
    if t.user_attrs.get("infeasible"):
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["quality_predicted"] and t.values[0] == t.user_attrs["predicted"]
            assert t.values[1] == t.user_attrs["params_fraction"] > BUDGET
        else:
            assert t.state == TrialState.PRUNED and t.values is None
        assert t.user_attrs["constraint"] > 0 and t.constraints[0] > 0
        assert "top1" not in t.user_attrs and "ray_trial" not in t.user_attrs
        return False
    assert all(k in t.user_attrs for k in ATTRS), sorted(t.user_attrs)
    assert t.values[1] <= BUDGET + 1e-12 and t.user_attrs["constraint"] <= 1e-12
    return True


# -- PostgreSQL -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_url() -> str:
    """$AUTOHYBRID_TEST_PG, else a server from scripts/postgres.sh; skip when neither works,
    except in CI (CI=true), where a missing PostgreSQL is a failure."""
    url = os.environ.get("AUTOHYBRID_TEST_PG")
    if url:
        return url
    try:
        r = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh")], capture_output=True,
                           text=True, timeout=600)
        m = re.search(r"AUTOHYBRID_TEST_PG=(\S+)", r.stdout)
        reason = (r.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        m, reason = None, str(e)
    if m:
        return m.group(1)
    msg = f"no PostgreSQL: AUTOHYBRID_TEST_PG is unset and scripts/postgres.sh failed: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def test_three_workers_on_postgresql(pg_url, tmp_path):
    study_name = f"dist-{uuid.uuid4().hex[:8]}"
    try:
        reports = run_workers(tmp_path, 3, pg_url, study_name, trials=8)
        print("postgresql:", reports)
        study = optuna.load_study(study_name=study_name, storage=pg_url)
        check_shared_study(study, reports, trials=8)
    finally:
        try:
            optuna.delete_study(study_name=study_name, storage=pg_url)
        except KeyError:
            pass


# -- journal file -----------------------------------------------------------------------------
def test_two_workers_on_a_journal_file(tmp_path):
    spec = f"journal:{tmp_path / 'study.log'}"
    reports = run_workers(tmp_path, 2, spec, "s", trials=8)
    print("journal:", reports)
    check_shared_study(optuna.load_study(study_name="s", storage=get_storage(spec, tmp_path)),
                       reports, trials=8)


# -- SIGKILL ----------------------------------------------------------------------------------
def _poll(url: str, until, timeout: float = 120) -> list[FrozenTrial]:
    """The trials of study "s" in the SQLite file at ``url`` once ``until(trials)``, polled
    every 0.1 s. Opens the storage only once the worker has created its schema: RDBStorage
    creates missing tables, and two processes doing that at once collide."""
    path, storage, deadline = url.removeprefix("sqlite:///"), None, time.time() + timeout
    while time.time() < deadline:
        try:
            if storage is None:
                with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    ready = db.execute("SELECT 1 FROM alembic_version").fetchone()
                storage = optuna.storages.RDBStorage(url) if ready else None
            trials = optuna.load_study(study_name="s", storage=storage).get_trials()
        except Exception:  # no database, schema or study yet, or sqlite busy
            trials = []
        if trials and until(trials):
            return trials
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the worker")


def _count(trials, state):
    return sum(t.state == state for t in trials)


def test_sigkilled_worker_resumes_without_losing_trials(tmp_path):
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    proc = spawn(out=str(out), storage=None, trials=40, slow=0.3)
    try:
        # killed while scoring (its allocation decided) after three complete trials
        _poll(url, lambda ts: _count(ts, TrialState.COMPLETE) >= 3 and any(
            t.state == TrialState.RUNNING and "allocation" in t.user_attrs for t in ts))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    # what was stored at the moment of the kill (re-read: a trial may have finished meanwhile)
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    before = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    dead = [t for t in trials if t.state == TrialState.RUNNING]
    assert len(before) >= 3 and len(dead) == 1 and dead[0].user_attrs["pid"] == proc.pid

    # rerun to a total two above what was complete: the dead pid's RUNNING trial is failed
    # and enqueued again when the study is opened, before any new trial is asked for
    total = len(before) + 2
    report = finish(spawn(out=str(out), storage=None, trials=total), out)
    after = {t.number: t for t in optuna.load_study(study_name="s", storage=url).get_trials()}
    assert all(after[n].values == v for n, v in before.items())
    assert after[dead[0].number].state == TrialState.FAIL
    redo = [t for t in after.values() if t.user_attrs.get("retry_of") == dead[0].number]
    assert [t.number for t in redo] == [max(t.number for t in trials) + 1]
    assert redo[0].state == TrialState.COMPLETE and redo[0].params == dead[0].params
    assert redo[0].user_attrs["allocation"] == dead[0].user_attrs["allocation"]
    assert redo[0].number in report["complete"]
    assert _count(after.values(), TrialState.COMPLETE) == total  # one worker: exactly
    assert not [t for t in after.values() if t.state in (TrialState.RUNNING,
                                                         TrialState.WAITING)]


# -- Ray --------------------------------------------------------------------------------------
class _Interrupter(threading.Thread):
    """Sends SIGINT to this process (as Ctrl-C would; Tune stops gracefully) once ``complete``
    trials are complete, unless ``done`` is set first."""

    def __init__(self, url: str, complete: int):
        super().__init__(daemon=True)
        self.url, self.complete, self.done = url, complete, threading.Event()

    def run(self):
        try:
            _poll(self.url, lambda ts: self.done.is_set()
                  or _count(ts, TrialState.COMPLETE) >= self.complete, timeout=420)
        except AssertionError:
            return
        if not self.done.is_set():
            os.kill(os.getpid(), signal.SIGINT)


def test_ray_backend_interrupted_then_resumed_with_a_larger_total(tmp_path):
    pytest.importorskip("ray")
    from autohybrid.search.ray_backend import run_ray

    out = tmp_path / "ray"
    cfg, storage, ps, ev, warm, inv = build(out, None, trials=8, slow=0.5, backend="ray",
                                            concurrency=2)
    url = f"sqlite:///{out / 'study.db'}"
    interrupter = _Interrupter(url, complete=3)
    interrupter.start()
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ray(cfg, storage, "s", ps, ev, None, IDENTITY, warm)
    finally:
        interrupter.done.set()
        interrupter.join(5)
    first = time.time() - t0
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    before = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert 3 <= len(before) < 8 and running  # stopped midway, with trials in flight
    assert (out / "ray_results" / "s").is_dir()

    cfg.trials, cfg.resume = 10, True
    study = run_ray(cfg, storage, "s", ps, ev, None, IDENTITY, warm)
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    # one driver: the searcher stops at the total exactly, counted as SearchStudy.run counts
    # (evaluated within the budget; infeasible trials are told without a Ray trial)
    assert len([t for t in done if t.user_attrs["constraint"] <= 0]) == 10
    assert all({t.number: t.values for t in done}[n] == v for n, v in before.items())
    # the trials Tune had running were run again by the restored experiment, as themselves
    assert all(trials[n].state == TrialState.COMPLETE for n in running)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert [t.user_attrs.get("warm_start") for t in trials].count("uniform") == 1
    evaluated = [t for t in done if check_complete(t)]  # infeasible ones never reach Ray
    assert len({t.user_attrs["ray_trial"] for t in evaluated}) == len(evaluated)
    for t in evaluated:
        cost = ah.Allocation.for_inventory(inv, trial_layers(t)).cost(inv)
        assert cost.params_fraction == pytest.approx(t.values[1])
        assert t.values[0] == pytest.approx(t.user_attrs["kl"])
    print(f"ray: interrupted at {len(before)} complete + {len(running)} running "
          f"({first:.0f} s); resumed to 10 ({time.time() - t0 - first:.0f} s)")


# -- storage URLs -----------------------------------------------------------------------------
def test_password_is_masked_in_urls_and_errors(tmp_path):
    url = "postgresql://u:secret@127.0.0.1:1/db"
    assert mask_url(url) == "postgresql://u:***@127.0.0.1:1/db"
    with pytest.raises(ConfigError) as e:
        get_storage(url, tmp_path)
    assert "secret" not in str(e.value) and "127.0.0.1:1" in str(e.value)
    SearchConfig(storage=url).save(tmp_path / "config.yaml")
    assert "secret" not in (tmp_path / "config.yaml").read_text()


def test_ray_stops_at_trials_within_the_budget_as_the_optuna_path_does():
    """``--trials`` counts evaluated trials within the budget on both backends (one stop
    rule, ``SearchStudy.finished``): trials that could not be repaired into the budget, or
    were screened, do not count, and trials in flight count as the Ray searcher's."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from autohybrid.search.ray_backend import StudySearcher

    study = optuna.create_study(directions=["minimize", "minimize"])
    for constraint in (-0.01, 0.2, 0.0, 0.3):  # two within the budget, two over it
        study.add_trial(optuna.trial.create_trial(
            values=[1.0, 0.5] if constraint <= 0 else None, user_attrs={"constraint": constraint},
            state=TrialState.COMPLETE if constraint <= 0 else TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))
    ss = SimpleNamespace(study=study, cfg=SearchConfig(trials=3))
    ss.counts = lambda: SearchStudy.counts(ss)
    ss.finished = lambda running=0: SearchStudy.finished(ss, running)
    assert ss.counts() == (2, 5)
    assert not ss.finished() and ss.finished(running=1)
    searcher = StudySearcher.__new__(StudySearcher)
    searcher.ss, searcher.live, searcher.numbers = ss, {"t1"}, {"t1": 4}
    assert searcher.suggest("t2") is None  # the running trial may reach the total
    study.add_trial(optuna.trial.create_trial(values=[1.0, 0.5],
                                              user_attrs={"constraint": -0.1}))
    assert searcher.suggest("t3") == "FINISHED"


def test_unreachable_ray_address_is_a_config_error(tmp_path):
    pytest.importorskip("ray")
    from autohybrid.search.ray_backend import run_ray

    cfg, storage, ps, ev, warm, _ = build(tmp_path, None, trials=2, backend="ray",
                                          ray_address="127.0.0.1:1")
    with pytest.raises(ConfigError, match="cannot reach Ray at '127.0.0.1:1'"):
        run_ray(cfg, storage, "s", ps, ev, None, IDENTITY, warm)

