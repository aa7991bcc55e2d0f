"""Faults: ``autohybrid search`` killed with SIGKILL in each of its stages, and a Ray Tune trial
process killed mid-trial.

Each run of the CLI (``autohybrid search ...``) is a process of its own, killed the moment the
files it writes show it mid-stage: during the sensitivity analysis (some layers done), during
a search trial (one RUNNING with its allocation decided), during fine-tuning (a checkpoint
written, steps left). Each time the same command is rerun; the last rerun must end with the
outputs of an uninterrupted run of that command (same seed, one worker), which runs beside
the interrupted one, and each rerun must redo only what was unfinished.

Tiny setup: CIFAR ResNet-20 with random weights at 8x8 on scikit-learn's digits (no downloads,
no ../shared), the six convs of layer3 searched, 16 fine-tune steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from autohybrid.export import WEIGHTS
from autohybrid.finetune import CHECKPOINT_NAME
from autohybrid.models import create_model
from tests.search.test_distributed import IDENTITY, build, check_complete
from tests.search.test_pipeline import SPACE  # the same tiny layer3 space

REPO = Path(__file__).resolve().parents[2]
# the module's fixture runs the whole CLI five times (one of them beside the others): its
# setup counts against its first test's timeout, more than pytest's default 600 s allows on
# a busy 2-core machine
pytestmark = pytest.mark.timeout(1800)

LAYERS = 6  # layer3.{0,1,2}.conv{1,2}
STEPS = 16  # the winner's fine-tune; 4 candidates halved by 2: rungs at 0, 8 and 16 steps,
RUNG_STEPS = (0, 8, 16)  # checkpoints every 2 steps (a quarter of the first rung)
STUDY = "cifar_resnet20-params-0.6"


# -- running and killing the CLI --------------------------------------------------------------
def _common(d: Path, out: Path) -> list[str]:
    return ["--model", "cifar_resnet20", "--checkpoint", str(d / "r20.pth"), "--data", "digits",
            "--input-size", "3", "8", "8", "--calib", "128", "--batch-size", "64",
            "--search-space", str(d / "space.yaml"), "--seed", "0", "--out", str(out)]


def _search(d: Path, out: Path) -> list[str]:
    return ["search", *_common(d, out), "--budget", "0.6", "--trials", "10", "--population",
            "4", "--val", "100", "--candidates", "4", "--eta", "2", "--finetune-steps",
            str(STEPS), "--no-speed"]


class Run:
    """``autohybrid ARGV`` as a process of its own, started as a user starts it
    (``python -m autohybrid.cli.main ARGV``), its output into ``log``. A fresh interpreter, not
    a fork: a fork of this process (which holds torch's thread pools and, after the Ray tests,
    gRPC threads) can crash in the child before it reaches the CLI."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "w") as stream:
            self.proc = subprocess.Popen([sys.executable, "-m", "autohybrid.cli.main", *argv],
                                         stdout=stream, stderr=subprocess.STDOUT, env=env,
                                         cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n")

    def finish(self, timeout: float = 600) -> str:
        code = self.proc.wait(timeout)
        assert code == 0, f"exit {code}:\n{self.text()[-3000:]}"
        return self.text()

    def kill_when(self, ready, timeout: float = 480) -> float:
        """SIGKILL as soon as ``ready()``; the time of the kill."""
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before the kill:\n" \
                f"{self.text()[-3000:]}"
            assert time.time() < deadline, f"timed out:\n{self.text()[-3000:]}"
            time.sleep(0.02)
        os.kill(self.proc.pid, signal.SIGKILL)
        killed = time.time()
        assert self.proc.wait(30) == -signal.SIGKILL
        return killed


# -- what a run left on disk ------------------------------------------------------------------
def _partial_layers(folder: Path) -> list[str]:
    """Layers in the sensitivity analysis' partial file (rewritten atomically per layer)."""
    for path in folder.glob(".sensitivity-*.partial.csv"):
        try:
            return list(dict.fromkeys(pd.read_csv(path).layer))
        except (FileNotFoundError, pd.errors.EmptyDataError):
            pass
    return []


def _trial_rows(out: Path) -> list[tuple[int, str, bool, bool]]:
    """(number, state, allocation decided, enqueued: a warm start or a local move) per trial,
    read straight from the SQLite file."""
    try:
        with closing(sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True)) as db:
            return db.execute(
                "SELECT number, state, EXISTS(SELECT 1 FROM trial_user_attributes a WHERE "
                "a.trial_id = t.trial_id AND a.key = 'allocation'), "
                "EXISTS(SELECT 1 FROM trial_user_attributes a WHERE a.trial_id = t.trial_id "
                "AND a.key IN ('warm_start', 'local_of')) FROM trials t").fetchall()
    except sqlite3.Error:  # no file, no schema yet, or busy
        return []


def _mid_trial(out: Path) -> bool:
    """Killed here, the trial that is RUNNING was drawn by the sampler (not a warm start or a
    local move) and is being scored."""
    rows = _trial_rows(out)
    return sum(s == "COMPLETE" for _, s, _, _ in rows) >= 5 and any(
        s == "RUNNING" and alloc and not fixed for _, s, alloc, fixed in rows)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "select").glob(f"trial-*/{CHECKPOINT_NAME}"))


def _step(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=True)["step"]
    except (OSError, RuntimeError, EOFError, KeyError):  # gone, or not yet complete
        return None


def _mid_rung(out: Path) -> bool:
    """A candidate's fine-tune checkpointed between two rungs' steps."""
    return any(_step(p) not in (None, *RUNG_STEPS) for p in _checkpoints(out))


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}").trials


def _record(t: optuna.trial.FrozenTrial) -> tuple:
    """What a trial decided and measured, without its number or timing."""
    keep = ("allocation", "warm_start", "kl", "loss", "top1", "agreement", "screened")
    return (t.state.name, t.params, t.values, {k: t.user_attrs.get(k) for k in keep})


# -- the scenario: one uninterrupted run, one killed three times ------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    torch.save(create_model("cifar_resnet20").state_dict(), d / "r20.pth")
    (d / "space.yaml").write_text(SPACE)
    ref_out, out = d / "reference", d / "killed"
    reference = Run(_search(d, ref_out), d / "reference.log")  # beside the killed one
    facts: dict = {"d": d, "ref": ref_out, "out": out}
    try:
        # 1. during the sensitivity analysis, with some but not all layers done
        sens = out / "sensitivity"
        Run(_search(d, out), d / "kill-1.log").kill_when(lambda: len(_partial_layers(sens)) > 0)
        facts["sens_done"] = _partial_layers(sens)
        # 2. during a trial: the rerun finishes the sensitivity analysis, then is killed
        #    while it scores a trial (tried again in the rare case the kill fell between two)
        facts["dead"] = []
        for attempt in range(3):
            run = Run(_search(d, out), d / f"kill-2.{attempt}.log")
            facts["trial_kill"] = run.kill_when(lambda: _mid_trial(out))
            facts.setdefault("log2", run.text())
            facts["at_kill"] = _trials(out)
            running = [t for t in facts["at_kill"] if t.state == TrialState.RUNNING]
            facts["dead"] += [t.number for t in running]
            if any("allocation" in t.user_attrs for t in running):
                break
        # 3. during a rung of the selection, after a checkpoint, with steps of the rung left
        run = Run(_search(d, out), d / "kill-3.log")
        run.kill_when(lambda: _mid_rung(out))
        facts["log3"] = run.text()  # the rerun that recovered the dead trial
        facts["ckpt"] = {p.parent.name: _step(p) for p in _checkpoints(out)}
        # 4. to the end
        facts["log4"] = Run(_search(d, out), d / "rerun.log").finish()
        facts["ref_log"] = reference.finish()
    finally:
        if reference.proc.poll() is None:
            reference.proc.kill()
            reference.proc.wait()
    return facts


def test_killed_in_sensitivity_recomputes_only_unfinished_layers(runs):
    done, out = runs["sens_done"], runs["out"]
    assert 1 <= len(done) < LAYERS, done
    meta = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert meta["resumed_layers"] == done  # the rerun kept these and computed only the rest
    assert f"{len(done)} of {LAYERS} layers already done" in runs["log2"]
    assert len(meta["layers"]) == LAYERS
    assert not list((out / "sensitivity").glob(".sensitivity-*.partial.csv"))
    ref = runs["ref"] / "sensitivity"
    assert json.loads((ref / "sensitivity.json").read_text())["resumed_layers"] == []
    # the same table, byte for byte: same rows, same values
    assert (out / "sensitivity" / "sensitivity.csv").read_bytes() == (
        ref / "sensitivity.csv").read_bytes()


def test_sensitivity_subcommand_killed_then_rerun(runs):
    """``autohybrid sensitivity`` with the search's settings: killed, rerun, the same table as
    the uninterrupted search computed."""
    d, out = runs["d"], runs["d"] / "sensitivity"
    argv = ["sensitivity", *_common(d, out)]
    Run(argv, d / "sens-kill.log").kill_when(lambda: len(_partial_layers(out)) > 0)
    done = _partial_layers(out)
    assert 1 <= len(done) < LAYERS, done
    log = Run(argv, d / "sens-rerun.log").finish()
    assert f"{len(done)} layers kept from an interrupted run" in log
    assert json.loads((out / "sensitivity.json").read_text())["resumed_layers"] == done
    assert (out / "sensitivity.csv").read_bytes() == (
        runs["ref"] / "sensitivity" / "sensitivity.csv").read_bytes()


def test_killed_in_a_trial_continues_as_the_uninterrupted_search(runs):
    at_kill, out = runs["at_kill"], runs["out"]
    # the rerun of the dead trial sets its own budget constraint (not copied from the dead one)
    assert "constraint value is ignored" not in runs["log3"]
    (dead,) = [t for t in at_kill if t.state == TrialState.RUNNING]
    assert "allocation" in dead.user_attrs  # killed while it was being scored
    assert not dead.user_attrs.get("warm_start")  # a trial the sampler drew
    trials, reference = _trials(out), _trials(runs["ref"])
    # finished trials were kept as they were, not evaluated again
    after = {t.number: t for t in trials}
    for t in at_kill:
        if t.state.is_finished():
            assert after[t.number].values == t.values
            assert after[t.number].datetime_complete == t.datetime_complete
    # the dead trial failed and was rerun first, with its allocation; the rest is new
    assert after[dead.number].state == TrialState.FAIL
    retry = after[dead.number + 1]
    assert retry.user_attrs["retry_of"] == dead.number and retry.params == dead.params
    assert retry.user_attrs["allocation"] == dead.user_attrs["allocation"]
    assert retry.datetime_start.timestamp() > runs["trial_kill"]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == runs["dead"]
    # ... and the study is the uninterrupted one: the same trials in the same order, with the
    # same parameters, allocations and values (the sampler draws per trial, seeded by the
    # trial's index, so it continued where it stopped)
    kept = [t for t in trials if t.state != TrialState.FAIL]
    assert [_record(t) for t in kept] == [_record(t) for t in reference]
    assert not [t for t in reference if t.state == TrialState.FAIL]
    assert len(reference) > dead.number + 2  # the search went on well past the kill


def test_killed_in_a_rung_resumes_to_the_same_winner_and_weights(runs):
    """Killed while a candidate fine-tunes within a rung, the rerun continues that fine-tune
    from its checkpoint and ends with the uninterrupted run's winner, bit for bit."""
    out, ref = runs["out"], runs["ref"]
    (trial, step), = [(t, s) for t, s in runs["ckpt"].items() if s not in RUNG_STEPS]
    assert 1 <= step < STEPS  # killed with steps left after a checkpoint
    assert f"finetune: resuming from {out / 'select' / trial / CHECKPOINT_NAME} at step " \
           f"{step} of {STEPS}" in runs["log4"]
    # the uninterrupted run continues each fine-tune from its checkpoint at a rung's step only
    resumed = re.findall(r"finetune: resuming from \S+ at step (\d+) of", runs["ref_log"])
    assert resumed and all(int(s) in RUNG_STEPS for s in resumed)
    front, ref_front = pd.read_csv(out / "pareto.csv"), pd.read_csv(ref / "pareto.csv")
    numbered = ["trial", "allocation", "model"]  # the retried trial shifted the numbers
    pd.testing.assert_frame_equal(front.drop(columns=numbered),
                                  ref_front.drop(columns=numbered))
    tuned = front.dropna(subset=["model"])
    assert len(tuned) == 1 and tuned.returned.all()
    for a, b in zip(front.model.dropna(), ref_front.model.dropna()):
        weights, ref_weights = load_file(out / a / WEIGHTS), load_file(ref / b / WEIGHTS)
        assert weights.keys() == ref_weights.keys()
        for k, v in weights.items():  # bit for bit
            assert v.dtype == ref_weights[k].dtype and torch.equal(v, ref_weights[k]), k
    for a, b in zip(front.allocation, ref_front.allocation):
        assert _layers(out / a) == _layers(ref / b)


def test_two_workers_share_the_selection_stage(runs, tmp_path):
    """Two ``autohybrid search`` processes on one study whose search is done, started at
    once on the same ``--out``: they split the rungs' work by claims (no candidate's rung is
    done twice), wait for each other at each rung, and end with the one-worker run's
    candidates, values, winner and weights, bit for bit."""
    import shutil

    d, ref = runs["d"], runs["ref"]
    out = tmp_path / "shared"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("select", "models", "pareto.*"))
    optuna.delete_study(study_name=STUDY + ":select", storage=f"sqlite:///{out / 'study.db'}")
    workers = [Run(_search(d, out), tmp_path / f"worker-{i}.log") for i in range(2)]
    logs = [w.finish() for w in workers]
    done = [re.findall(r"trial (\d+): validation top-1 [\d.]+ % after (\d+) step", log)
            for log in logs]
    every = done[0] + done[1]
    assert len(every) == len(set(every)), done  # no candidate's rung was done twice
    # ... and every one was done: as many as the one-worker run reported at each step
    ref_stage = optuna.load_study(study_name=STUDY + ":select",
                                  storage=f"sqlite:///{ref / 'study.db'}").trials
    assert Counter(int(s) for _, s in every) == Counter(
        s for t in ref_stage for s in t.intermediate_values)
    _assert_same_selection(out, ref)


def _assert_same_selection(out: Path, ref: Path) -> None:
    """``out``'s selection ended as ``ref``'s: the same ``pareto.csv`` and the winner's
    weights bit for bit; and every claim in ``out``'s stage study was released."""
    front, ref_front = pd.read_csv(out / "pareto.csv"), pd.read_csv(ref / "pareto.csv")
    pd.testing.assert_frame_equal(front, ref_front)
    (model,) = front.model.dropna()
    weights, ref_weights = load_file(out / model / WEIGHTS), load_file(ref / model / WEIGHTS)
    assert weights.keys() == ref_weights.keys()
    for k, v in weights.items():
        assert torch.equal(v, ref_weights[k]), k
    claims = [k for t in optuna.load_study(study_name=STUDY + ":select",
                                           storage=f"sqlite:///{out / 'study.db'}").trials
              for k, v in t.user_attrs.items() if k.startswith("claim_") and v is not None]
    assert claims == []  # every claim released


def test_ray_backend_shares_the_selection_stage_between_ray_tasks(runs, tmp_path):
    """``--backend ray --concurrency 2`` on a study whose search is done: two Ray tasks (not
    the CLI's own process) do the stage's rungs, by the same claims and the same pruner, and
    the run ends with the one-worker Optuna run's candidates, values, winner and weights, bit
    for bit."""
    import shutil

    pytest.importorskip("ray")
    d, ref = runs["d"], runs["ref"]
    out = tmp_path / "ray"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("select", "models", "pareto.*"))
    url = f"sqlite:///{out / 'study.db'}"
    optuna.delete_study(study_name=STUDY + ":select", storage=url)
    run = Run([*_search(d, out), "--backend", "ray", "--concurrency", "2"],
              tmp_path / "ray.log")
    log = run.finish()
    assert "2 Ray task(s) share the stage" in log
    _assert_same_selection(out, ref)
    stage = optuna.load_study(study_name=STUDY + ":select", storage=url).trials
    ref_stage = optuna.load_study(study_name=STUDY + ":select",
                                  storage=f"sqlite:///{ref / 'study.db'}").trials
    assert [t.intermediate_values for t in stage] == [t.intermediate_values for t in ref_stage]
    assert [t.state for t in stage] == [t.state for t in ref_stage]
    # every report came from a Ray task, none from the CLI's own process (how the work
    # splits between the two tasks depends on when each started: not asserted)
    workers = [t.user_attrs[f"worker_{s}"] for t in stage for s in t.intermediate_values]
    pids = {int(w.rsplit(":", 1)[1]) for w in workers}
    assert 1 <= len(pids) <= 2 and run.proc.pid not in pids, workers
    print(f"reports per Ray task: {dict(Counter(workers))}")


def _layers(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["layers"]


# -- Ray: a trial process killed --------------------------------------------------------------
def _killed_once(evaluator, marker: Path):
    """The evaluator, except that the first score anywhere writes this process's pid and Tune
    trial id to ``marker`` and waits to be killed; every score is logged beside it. A local
    class: cloudpickle ships it by value to the Ray workers."""
    from autohybrid.search.objective import Evaluator

    class KilledOnce(Evaluator):
        def score(self, layers):
            from ray import tune

            trial = tune.get_context().get_trial_id()
            with open(marker.with_suffix(".scores"), "a") as f:
                f.write(f"{trial} {os.getpid()}\n")
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().score(layers)
            os.write(fd, f"{trial} {os.getpid()}".encode())
            os.close(fd)
            time.sleep(120)  # SIGKILLed by the test meanwhile
            raise AssertionError("not killed")

    evaluator.__class__ = KilledOnce
    return evaluator


def test_ray_trial_process_killed_is_retried_by_ray(tmp_path):
    pytest.importorskip("ray")
    from autohybrid.search.ray_backend import run_ray

    out = tmp_path / "ray"
    cfg, storage, ps, ev, warm, _ = build(out, None, trials=3, backend="ray", concurrency=1)
    marker = tmp_path / "kill-me"
    ev = _killed_once(ev, marker)
    killed: dict = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline:
            if marker.exists() and marker.read_text():
                trial, pid = marker.read_text().split()
                os.kill(int(pid), signal.SIGKILL)
                killed.update(trial=trial, pid=int(pid))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    study = run_ray(cfg, storage, "s", ps, ev, None, IDENTITY, warm)
    thread.join(5)
    assert killed, "no trial reached the evaluator"
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3  # the requested total
    assert not [t for t in trials if t.state != TrialState.COMPLETE]  # nothing failed
    # the killed Tune trial was run again, in another process, and completed its Optuna trial
    scores = [line.split() for line in marker.with_suffix(".scores").read_text().splitlines()]
    attempts = [int(pid) for trial, pid in scores if trial == killed["trial"]]
    assert attempts[0] == killed["pid"] and len(attempts) == 2 and attempts[1] != killed["pid"]
    (victim,) = [t for t in trials if t.user_attrs.get("ray_trial") == killed["trial"]]
    assert victim.state == TrialState.COMPLETE and check_complete(victim)
    assert len({t.user_attrs.get("ray_trial") for t in done if check_complete(t)}) == len(
        [t for t in done if check_complete(t)])


# -- leftovers of a writer killed between write and rename ----------------------------------
def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    from autohybrid.io import atomic_path, remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    with atomic_path(tmp_path / "sub" / "pareto.csv") as live:  # this process: still writing
        live.write_text("partial")
        host = live.name.split(".")[-3].rsplit("-", 1)[0]
        stale = tmp_path / "sub" / f".report.html.{host}-{dead.pid}.ab_c12.tmp"
        stale.write_text("<html")
        other = tmp_path / f".config.yaml.otherhost-{dead.pid}.x1.tmp"  # another machine's
        other.write_text("budget")
        assert remove_stale_temps(tmp_path) == [stale]
        assert live.is_file() and other.is_file() and not stale.exists()
    assert (tmp_path / "sub" / "pareto.csv").read_text() == "partial"
