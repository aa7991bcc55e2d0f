"""The selection stage's pieces: the halving ladder, the pruner, the candidate pool.

The stage end to end (a search, its candidates halved over fine-tune steps on the validation
split, the winner exported) is in ``test_pipeline.py``; killed in a rung and rerun, in
``test_faults.py``.
"""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from autohybrid.exceptions import ConfigError
from autohybrid.search.select import (
    RungPruner,
    SelectionStudy,
    candidate_pool,
    family,
    ladder,
    ladder_for_budget,
)
from autohybrid.search.study import _dump
from autohybrid.spec import LayerSpec


# -- the ladder -----------------------------------------------------------------------------
@pytest.mark.parametrize("n, eta, sizes", [
    (6, 3, (6, 2, 1)), (9, 3, (9, 3, 1)), (8, 2, (8, 4, 2, 1)), (1, 3, (1, 1)), (2, 3, (2, 1)),
    (27, 3, (27, 9, 3, 1)),
])
def test_ladder_halves_down_to_one_with_eta_times_the_steps(n, eta, sizes) -> None:
    lad = ladder(n, eta, 600)
    assert lad.sizes == sizes
    assert lad.steps[0] == 0 and lad.steps[-1] == 600 == lad.full
    assert len(lad.steps) == len(lad.sizes)
    for a, b in zip(lad.steps[1:], lad.steps[2:]):
        assert abs(b / a - eta) < 0.05 * eta  # eta times more steps each rung (rounded)
    # survivors of each rung: max(1, n // eta) of those entering it
    assert all(b == max(1, a // eta) for a, b in zip(lad.sizes[:-1], lad.sizes[1:]) if a > 1)
    assert lad.cost == sum(k * (y - x) for k, x, y in zip(lad.sizes[1:], lad.steps,
                                                         lad.steps[1:]))


def test_ladder_for_budget_is_the_longest_that_fits() -> None:
    for n, eta, budget in [(6, 3, 800), (9, 3, 1000), (8, 2, 500), (1, 3, 50), (13, 4, 777)]:
        lad = ladder_for_budget(n, eta, budget)
        assert lad.cost <= budget
        assert ladder(n, eta, lad.full + 1).cost > budget  # one step more would not fit
    assert ladder_for_budget(6, 3, 800).full == 600  # 2 x 200 + 1 x 400


def test_no_finetune_budget_keeps_the_best_of_rung_zero() -> None:
    """Budget 0: one rung, no fine-tune step, and the pruner keeps exactly the best one."""
    lad = ladder_for_budget(5, 3, 0)
    assert (lad.sizes, lad.steps, lad.cost, lad.full) == ((5,), (0,), 0, 0)
    values = [61.0, 70.0, 55.0, 70.0, 64.0]
    study, trials = _stage(lad, values)
    for t, v in zip(trials, values):
        t.report(v, 0)
    assert [t.should_prune() for t in trials] == [True, False, True, True, True]  # tie: earlier
    one = ladder_for_budget(1, 3, 0)
    study, (t,) = _stage(one, [50.0])
    t.report(50.0, 0)
    assert not t.should_prune()


# -- the pruner -----------------------------------------------------------------------------
def _stage(lad, values: list[float]):
    study = optuna.create_study(direction="maximize", pruner=RungPruner(lad))
    trials = [study.ask() for _ in values]
    return study, trials


@pytest.mark.parametrize("n, eta", [(6, 3), (9, 3), (8, 2), (10, 3), (5, 4)])
def test_a_rungs_survivors_are_exactly_its_top_one_over_eta(n, eta) -> None:
    """Whatever order the candidates are decided in, each rung keeps exactly the best
    max(1, n // eta) by validation accuracy (Optuna's own SuccessiveHalvingPruner, being
    asynchronous, keeps whoever arrives first against few competitors)."""
    lad = ladder(n, eta, 90)
    rng = random.Random(n * 10 + eta)
    values = [rng.choice([50.0, 60.0, 70.0]) + rng.random() for _ in range(n)]
    study, trials = _stage(lad, values)
    alive = list(range(n))
    for k, step in enumerate(lad.steps[:-1]):
        for i in alive:
            trials[i].report(values[i] + k, step)
        order = alive[:]
        rng.shuffle(order)
        pruned = {i for i in order if trials[i].should_prune()}
        best = sorted(alive, key=lambda i: (-values[i], i))[:lad.sizes[k + 1]]
        assert set(alive) - pruned == set(best)
        for i in pruned:
            study.tell(trials[i], state=TrialState.PRUNED)
        alive = best
    assert len(alive) == 1 and alive[0] == max(range(n), key=lambda i: values[i])


def test_the_pruner_refuses_to_decide_a_rung_before_every_candidate_reported() -> None:
    lad = ladder(6, 3, 90)
    study, trials = _stage(lad, [0.0] * 6)
    for t in trials[:5]:
        t.report(1.0, 0)
    with pytest.raises(RuntimeError, match="rung 0 decided with 5 of 6"):
        trials[0].should_prune()
    trials[5].report(2.0, 0)
    assert not trials[5].should_prune() and trials[0].should_prune() is False
    assert trials[1].should_prune()  # top 2: trial 5 (2.0), then trial 0 (the earlier tie)


def test_optunas_asynchronous_pruner_would_keep_other_trials() -> None:
    """Why the stage has a pruner of its own: Optuna's SuccessiveHalvingPruner decides each
    trial against the values reported before it, so the first one always survives."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.
                                SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    trials = [study.ask() for _ in range(6)]
    for t, v in zip(trials, [10, 20, 30, 40, 50, 60]):
        t.report(v, 1)
    kept = [t.number for t in trials if not t.should_prune()]
    assert 0 in kept and kept != [5, 4]  # the worst survives; the top 2 are not what is kept


def test_selection_study_refuses_a_stored_stage_of_another_pool(tmp_path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    pool = [_trial(0, 0.1, 0.2, "sparse"), _trial(1, 0.2, 0.2, "svd")]
    lad = ladder(2, 3, 10)
    stage = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    assert sorted(stage.numbers) == [0, 1]
    again = SelectionStudy(storage, "s", pool, lad, {"val": 100})  # a rerun: the same trials
    assert again.numbers == stage.numbers and len(again.study.trials) == 2
    with pytest.raises(ConfigError, match="another ladder"):
        SelectionStudy(storage, "s", pool, ladder(2, 3, 20), {"val": 100})
    with pytest.raises(ConfigError, match="another val"):
        SelectionStudy(storage, "s", pool, lad, {"val": 200})


def test_a_late_worker_deciding_a_rung_leaves_what_another_worker_decided(tmp_path) -> None:
    """Two workers share the stage: one decided rung 0 and a survivor has already reported
    rung 1 when the other, which waited on rung 0, decides rung 0 too. Its decision is the
    same (nothing more pruned) and it does not judge the survivor at rung 1 before the rung
    is complete (the pruner asked about the trial's latest step would refuse: 1 of 2)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    pool = [_trial(i, 0.1, 0.2, "sparse") for i in range(4)]
    lad = ladder(4, 2, 8)  # rungs at 0, 4, 8 steps: 4, 2, 1
    first = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    late = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    for c, v in zip(range(4), [50.0, 70.0, 60.0, 40.0]):
        first.report(c, 0, v)
    assert sorted(first.decide([0, 1, 2, 3], 0)) == [0, 3]
    first.report(1, lad.steps[1], 75.0)  # survivor 1 goes on; survivor 2 not yet
    assert late.decide([0, 1, 2, 3], 0) == []
    assert late.live() == [1, 2]
    late.report(2, lad.steps[1], 65.0)
    assert late.decide(late.live(), lad.steps[1]) == [2]
    assert first.decide([1, 2], lad.steps[1]) == []  # decided already
    assert late.live() == [1]


def test_two_workers_deciding_a_rung_at_the_same_moment_both_go_on(tmp_path) -> None:
    """Both workers read the rung's trials as running, then one tells the pruned ones PRUNED
    before the other does: the second finds them told (Optuna's ValueError 'Cannot tell a
    PRUNED trial') and goes on with the same decision instead of failing the stage."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    pool = [_trial(i, 0.1, 0.2, "sparse") for i in range(4)]
    lad = ladder(4, 2, 8)
    first = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    late = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    for c, v in zip(range(4), [50.0, 70.0, 60.0, 40.0]):
        first.report(c, 0, v)
    stale = {c: late.trial(c) for c in range(4)}  # read before the other worker told them
    read = SelectionStudy.trial

    def trial(self, c):  # the first read of each candidate is the stale one
        return stale.pop(c) if c in stale else read(self, c)

    assert sorted(first.decide([0, 1, 2, 3], 0)) == [0, 3]
    late.trial = trial.__get__(late)
    assert late.decide([0, 1, 2, 3], 0) == []
    assert late.live() == [1, 2]
    first.finish(1, 75.0)
    late.finish(1, 75.0)  # told already: nothing to do
    assert [t.state for t in late.study.trials] == [TrialState.PRUNED, TrialState.COMPLETE,
                                                    TrialState.RUNNING, TrialState.PRUNED]


def test_a_second_worker_that_did_the_same_work_reports_after_the_trial_finished(tmp_path):
    """Two workers that took the same claim in one storage round trip both fine-tune the
    candidate; the first reports, exports and finishes the trial before the second reports.
    The second's report, its claim's release and any later claim leave the finished trial as
    it is, and nothing raises (Optuna refuses every update of a finished trial)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    pool = [_trial(0, 0.1, 0.2, "sparse")]
    lad = ladder(1, 2, 4)  # one candidate: rung 0, then its full fine-tune
    first = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    second = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    first.report(0, 0, 50.0)
    assert second.claim(0, 4)
    with second.holding(0, 4):
        first.report(0, 4, 60.0)
        first.finish(0, 60.0)
        second.report(0, 4, 60.0)  # the same seeded work, told after the trial is complete
        second.report(0, 0, 50.0)
    assert not second.claim(0, "export")
    (t,) = second.study.trials
    assert t.state == TrialState.COMPLETE and t.intermediate_values == {0: 50.0, 4: 60.0}
    assert t.user_attrs["claim_4"] is not None  # set before it finished: final, never raised


def test_of_two_workers_that_read_a_claim_free_only_the_last_writer_takes_it(
        tmp_path, monkeypatch) -> None:
    """B reads the claim free, then A reads it free and writes first, then B writes: A reads
    its claim back after B's write (``SETTLE_S``) and gives way, so the work is done once."""
    import os
    import threading
    import time

    from autohybrid.search import select

    monkeypatch.setattr(select, "_worker", lambda: {
        "worker": f"h:{threading.current_thread().name}", "host": "h", "pid": os.getpid(),
        "time": time.time()})
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    pool = [_trial(0, 0.1, 0.2, "sparse")]
    lad = ladder(1, 2, 4)
    a = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    b = SelectionStudy(storage, "s", pool, lad, {"val": 100})
    write = SelectionStudy.set_attr

    def slow_write(self, candidate, key, value):  # B: 0.2 s between its read and its write
        time.sleep(0.2)
        return write(self, candidate, key, value)

    b.set_attr = slow_write.__get__(b)
    won = {}
    tb = threading.Thread(target=lambda: won.update(b=b.claim(0, 4)), name="B")
    ta = threading.Thread(target=lambda: won.update(a=a.claim(0, 4)), name="A")
    tb.start()
    time.sleep(0.05)  # B has read the claim free; A reads it free too and writes first
    ta.start()
    ta.join()
    tb.join()
    assert won == {"a": False, "b": True}
    assert a.trial(0).user_attrs["claim_4"]["worker"] == "h:B"


# -- the pool -------------------------------------------------------------------------------
def _trial(number: int, quality: float, cost: float, method: str, warm: str = "",
           budget: float = 0.2, same_as: int | None = None) -> optuna.trial.FrozenTrial:
    k = number if same_as is None else same_as  # the allocation differs per trial unless
    spec = {"sparse": LayerSpec("sparse", sparsity=0.5 + k / 100),
            "svd": LayerSpec("svd", rank=(4 + k,)),
            "lowrank+sparse": LayerSpec("lowrank+sparse", rank=(2 + k,), sparsity=0.9)}[method]
    attrs = {"allocation": _dump({"a": spec}),
             "params_fraction": cost, "macs_fraction": cost, "constraint": cost - budget}
    if warm:
        attrs["warm_start"] = warm
    t = create_trial(values=[quality, cost], user_attrs=attrs)
    t.number = number
    return t


def test_pool_holds_the_warm_starts_one_per_family_and_the_best_near_the_budget() -> None:
    trials = [
        _trial(0, 0.10, 0.199, "sparse"), _trial(1, 0.11, 0.198, "sparse"),
        _trial(2, 0.12, 0.197, "sparse"), _trial(3, 0.13, 0.100, "sparse"),  # far below
        _trial(4, 0.50, 0.190, "svd"), _trial(5, 0.40, 0.195, "lowrank+sparse"),
        _trial(6, 0.90, 0.180, "sparse", warm="uniform_sparse"),
        _trial(7, 0.05, 0.250, "sparse"),  # over the budget: never a candidate
        _trial(8, 0.10, 0.199, "sparse", same_as=0),  # trial 0's allocation again
    ]
    pool = candidate_pool(trials, 0.2, 5)
    numbers = [t.number for t in pool]
    assert 6 in numbers and 4 in numbers and 5 in numbers  # warm start, low-rank, L+S
    assert 7 not in numbers and 3 not in numbers  # over the budget; far below it
    assert not {0, 8} <= set(numbers)  # one per distinct allocation
    assert len(pool) == 5 and [t.values[0] for t in pool] == sorted(t.values[0] for t in pool)
    assert {family(t) for t in pool} == {"sparse", "low-rank", "low-rank + sparse"}
    assert len(candidate_pool(trials, 0.2, 2)) == 4  # the warm start + 3 families: more than 2


# -- the device -----------------------------------------------------------------------------
def test_device_auto_is_a_gpu_when_there_is_one_else_the_cpu() -> None:
    import torch

    from autohybrid.search.select import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU here"):
            resolve_device("cuda")
