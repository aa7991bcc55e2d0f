"""Choosing what to return by the accuracy it reaches after fine-tuning.

The search ranks allocations by a calibration score of the model before any fine-tuning; what
a user keeps is the model after it. This stage closes the gap with successive halving over
fine-tune steps, every decision made on a validation split held out from the training split
(``DataBundle.splits``; the test split is only reported):

1. a **candidate pool** (``candidate_pool``): the best distinct within-budget trials at or near
   the budget, at least one per method family of the search, and the warm starts;
2. **rungs** (``Ladder``): rung 0 is each candidate as fitted, with no fine-tune; each next
   rung continues the survivors' fine-tunes to eta times more steps and keeps the top 1/eta
   by validation accuracy, until one candidate has had the full fine-tune. A candidate's
   fine-tune is one run of the full length, stopped at each rung and continued from its
   checkpoint (``finetune(..., stop_at=...)``), never restarted, so the winner's weights
   are those of an uninterrupted full fine-tune;
3. the stage is an Optuna study in the search's storage (``<study>:select``): one trial per
   candidate, its validation accuracy reported at each rung's step (``Trial.report``; the
   dashboard draws the ladder as learning curves), pruned by the study's pruner,
   ``RungPruner`` (asked as ``Trial.should_prune`` asks it, about the trial at the rung
   being decided). A killed stage rerun continues from what the study and the
   fine-tune checkpoints hold and ends with the same winner and weights;
4. **several workers** share the stage (every ``autohybrid search`` on the same study enters
   it once the search is done): each candidate's work at a rung is claimed in the study
   (``SelectionStudy.claim``: a lease, refreshed while held, taken over once its holder is
   dead), so no two workers fine-tune the same candidate, and a worker with nothing left to
   take waits for the rung's last report before the rung is decided. Workers sharing ``--out``
   continue each other's fine-tunes from its checkpoints; a worker with its own ``--out``
   prefers the candidates it holds checkpoints of, and one it takes over is fine-tuned from
   step 0 to the rung (the same weights: the fine-tune is seeded and deterministic).

Why not Optuna's ``SuccessiveHalvingPruner``: it is asynchronous (ASHA): a trial reaching a
rung is promoted when it is in the top 1/eta of the values reported there *so far*, so the
first trials to arrive are promoted against few competitors and the survivors depend on the
order trials are run in. Here every candidate reaches a rung before any is decided, so the
survivors are exactly the top 1/eta of the rung, whatever the order or a kill in between.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autohybrid.exceptions import ConfigError
from autohybrid.io import pid_alive
from autohybrid.methods import HYBRID, METHODS
from autohybrid.search.study import trial_layers, within_budget
from autohybrid.storage import GRACE_S, HEARTBEAT_S

__all__ = ["allocation_file", "Ladder", "RungPruner", "Selection", "SelectionStudy",
           "Validation", "candidate_pool", "family", "fit_candidate", "ladder",
           "ladder_for_budget", "ladder_of", "recipe", "resolve_device", "search_row",
           "test_top1", "SELECT_SUFFIX"]

SELECT_SUFFIX = ":select"
FAMILIES = ("sparse", "low-rank", "low-rank + sparse")
NEAR = 0.8  # "near the budget": at least this fraction of it
POLL_S = 1.0  # how often a worker with nothing to take looks at the study again
SETTLE_S = 0.5  # a claim is read back this long after it is written (``claim``)


# -- the pool -------------------------------------------------------------------------------
def family(trial: FrozenTrial) -> str:
    """The method family most of a trial's compressed layers use (by count)."""
    names = []
    for spec in trial_layers(trial).values():
        if spec.method == HYBRID:
            names.append("low-rank + sparse")
        elif spec.method in METHODS and METHODS[spec.method].lowrank:
            names.append("low-rank")
        elif spec.method != "dense":
            names.append("sparse")
    return Counter(names).most_common(1)[0][0] if names else "dense"


def candidate_pool(trials: list[FrozenTrial], budget: float, size: int) -> list[FrozenTrial]:
    """The trials to fine-tune: every warm start within the budget, the best trial of each
    method family, then the best of the rest at or near the budget (cost at least
    ``NEAR`` of it) by the search's quality score (lower is better), then the best of all;
    one trial per distinct allocation. At least ``size`` trials where the study has them (more
    when the warm starts and families alone exceed it). Ordered by quality."""
    ok = sorted((t for t in trials if within_budget(t) and t.values
                 and t.values[1] <= budget + 1e-12), key=lambda t: (t.values[0], t.number))
    seen: set[str] = set()
    pool: list[FrozenTrial] = []

    def take(t: FrozenTrial) -> None:
        key = t.user_attrs.get("allocation", str(t.number))
        if key not in seen:
            seen.add(key)
            pool.append(t)

    for t in ok:
        if t.user_attrs.get("warm_start"):
            take(t)
    for fam in FAMILIES:
        best = next((t for t in ok if family(t) == fam), None)
        if best is not None:
            take(best)
    near = [t for t in ok if t.values[1] >= NEAR * budget]
    for t in near + ok:
        if len(pool) >= size:
            break
        take(t)
    return sorted(pool, key=lambda t: (t.values[0], t.number))



def allocation_file(number: int) -> str:
    """Trial ``number``'s allocation file, relative to the output folder."""
    return f"allocations/trial-{number:04d}.yaml"

# -- the ladder -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ladder:
    """Candidates entering each rung and the fine-tune steps each has had there (0 first)."""

    sizes: tuple[int, ...]
    steps: tuple[int, ...]
    eta: int

    @property
    def cost(self) -> int:
        """Fine-tune steps the whole ladder takes."""
        return sum(n * (b - a) for n, a, b in zip(self.sizes[1:], self.steps, self.steps[1:]))

    @property
    def full(self) -> int:
        return self.steps[-1]

    def keep(self, k: int) -> int | None:
        """How many candidates leave rung ``k`` for the next (the last rung: one, the winner;
        None where the rung decides nothing)."""
        if k + 1 < len(self.sizes):
            return self.sizes[k + 1]
        return 1 if self.sizes[k] > 1 else None

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "steps": list(self.steps), "eta": self.eta}


def ladder(n: int, eta: int, full: int) -> Ladder:
    """``n`` candidates halved by ``eta`` per rung down to one, which gets ``full`` steps;
    rung k (k >= 1 of K) fine-tunes to ``full / eta^(K-k)`` steps."""
    if n < 1 or eta < 2 or full < 1:
        raise ConfigError(f"a halving ladder needs >= 1 candidate, eta >= 2 and >= 1 full "
                          f"fine-tune step (got {n}, {eta}, {full})")
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // eta))
    if len(sizes) == 1:
        sizes.append(1)  # one candidate: rung 0, then its full fine-tune
    top = len(sizes) - 1
    steps = [0]
    for k in range(1, top + 1):
        steps.append(max(steps[-1] + 1, round(full * eta ** (k - top))))
    steps[-1] = max(full, steps[-2] + 1)
    return Ladder(tuple(sizes), tuple(steps), eta)


def ladder_of(cfg, candidates: int, train_images: int) -> Ladder:
    """The selection's ladder for ``cfg``: the winner's fine-tune as given (steps or epochs
    over ``train_images``), else the longest that keeps the whole ladder within
    ``cfg.finetune_budget`` steps."""
    from autohybrid.config import FINETUNE_BUDGET
    from autohybrid.finetune import FinetuneConfig

    if cfg.finetune_steps or cfg.finetune_epochs:
        batch = min(FinetuneConfig().batch_size, train_images)
        per_epoch = max(1, train_images // batch)
        full = cfg.finetune_steps or max(1, math.ceil(cfg.finetune_epochs * per_epoch))
        return ladder(candidates, cfg.eta, full)
    budget = FINETUNE_BUDGET if cfg.finetune_budget is None else cfg.finetune_budget
    return ladder_for_budget(candidates, cfg.eta, budget)


def no_finetune(n: int, eta: int) -> Ladder:
    """Rung 0 alone: the candidate with the best validation top-1 as fitted is returned,
    with no fine-tune (post-training compression)."""
    return Ladder((n,), (0,), eta)


def ladder_for_budget(n: int, eta: int, budget: int) -> Ladder:
    """The ladder with the longest full fine-tune whose total cost is within ``budget``
    (0: no fine-tune, rung 0 decides)."""
    if budget == 0:
        return no_finetune(n, eta)
    unit = ladder(n, eta, 10**6)
    full = max(1, math.floor(budget * 10**6 / max(unit.cost, 1)))
    lad = ladder(n, eta, full)
    while lad.cost > budget and full > 1:
        full -= 1
        lad = ladder(n, eta, full)
    return lad


# -- the pruner -----------------------------------------------------------------------------
class RungPruner(optuna.pruners.BasePruner):
    """Synchronous successive halving on a ``Ladder``: a trial that reported its value at
    rung k's step is pruned unless that value is among the best ``Ladder.keep(k)`` of the
    values every trial of the study reported at that step (ties: the earlier trial). Asked
    before all ``sizes[k]`` candidates have reported the rung, it raises: deciding early is
    what makes the asynchronous rule order-dependent."""

    def __init__(self, lad: Ladder):
        self.ladder = lad

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.ladder.steps:
            return False
        k = self.ladder.steps.index(step)
        keep = self.ladder.keep(k)
        if keep is None:
            return False
        reported = [(t.intermediate_values[step], t.number)
                    for t in study.get_trials(deepcopy=False)
                    if step in t.intermediate_values]
        if len(reported) < self.ladder.sizes[k]:
            raise RuntimeError(f"rung {k} decided with {len(reported)} of "
                               f"{self.ladder.sizes[k]} candidates reported")
        ranked = sorted(reported, key=lambda vn: (-vn[0], vn[1]))
        keep = {n for _, n in ranked[:keep]}
        return trial.number not in keep


# -- the stage study ------------------------------------------------------------------------
class SelectionStudy:
    """The selection stage as stored: an Optuna study ``<search study>:select`` in the
    search's storage, one trial per candidate (user attr ``candidate``: the search trial)."""

    def __init__(self, storage, study_name: str, pool: list[FrozenTrial], lad: Ladder,
                 meta: dict):
        self.storage, self.ladder, self._ids = storage, lad, {}
        name = study_name + SELECT_SUFFIX
        try:
            self.study = optuna.create_study(storage=storage, study_name=name,
                                             direction="maximize", pruner=RungPruner(lad))
        except optuna.exceptions.DuplicatedStudyError:  # a rerun, or another worker's stage
            self.study = optuna.load_study(study_name=name, storage=storage,
                                           pruner=RungPruner(lad))
            deadline = time.time() + GRACE_S  # the worker that created it fills it in
            while not self.study.user_attrs.get("ready") and time.time() < deadline:
                time.sleep(POLL_S)
        want = {"pool": [t.number for t in pool], "ladder": lad.to_dict(), **meta}
        have = {k: self.study.user_attrs.get(k) for k in want}
        differ = sorted(k for k in want if have[k] is not None and have[k] != want[k])
        if differ:
            raise ConfigError(
                f"the selection study {name!r} in this storage was run with another "
                f"{', '.join(differ)}; use a new --out (or --study-name), or rerun with the "
                "settings it was started with")
        for k, v in want.items():
            if have[k] is None:
                self.study.set_user_attr(k, v)
        self.numbers = {c: t.number for c, t in self.trials().items()}
        for t in pool:
            if t.number not in self.numbers:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Heartbeat of storage")  # ask() on an RDB
                    trial = self.study.ask()
                trial.set_user_attr("candidate", t.number)
                self.numbers[t.number] = trial.number
        self.study.set_user_attr("ready", True)

    def trials(self) -> dict[int, FrozenTrial]:
        """candidate -> its stage trial as stored now."""
        return {t.user_attrs["candidate"]: t for t in self.study.get_trials(deepcopy=False)
                if "candidate" in t.user_attrs}

    def trial(self, candidate: int) -> FrozenTrial:
        return self.storage.get_trial(self._tid(candidate))

    def live(self) -> list[int]:
        """Candidates not pruned (the winner, once complete, included), in pool order."""
        states = {c: t.state for c, t in self.trials().items()}
        return [c for c in self.study.user_attrs["pool"] if states[c] != TrialState.PRUNED]

    def reported(self, candidate: int, step: int) -> bool:
        return step in self.trial(candidate).intermediate_values

    def set_attr(self, candidate: int, key: str, value) -> bool:
        """Set a user attr of the candidate's trial; False when the trial is finished (pruned
        or complete: its attrs are final, and whatever this worker would add, the worker that
        finished it has)."""
        try:
            self.storage.set_trial_user_attr(self._tid(candidate), key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def report(self, candidate: int, step: int, value: float) -> None:
        """The candidate's validation accuracy after ``step`` fine-tune steps, and which
        worker measured it (user attr ``worker_<step>``: host:pid). A second worker that did
        the same work (two claims taken in one storage round trip, ``claim``) finds the value
        there: the work is seeded, so it is the same value, and it is left as it is, even
        when the trial has been finished meanwhile."""
        if self.reported(candidate, step):
            return
        try:
            self.set_attr(candidate, f"worker_{step}", _worker()["worker"])
            optuna.Trial(self.study, self._tid(candidate)).report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            if not self.reported(candidate, step):
                raise

    def decide(self, candidates: list[int], step: int) -> list[int]:
        """Ask the pruner about each candidate of the rung at ``step``, once all of them
        reported it; tell the pruned ones PRUNED. Returns those pruned now. A candidate
        already decided by another worker (pruned, or kept and gone on to report a later
        step) is left alone: the pruner is asked about the trial as read here, at this
        rung's step (what ``Trial.should_prune`` does, on a snapshot that cannot move on to
        the next rung in between)."""
        pruned = []
        for c in candidates:
            t = self.trial(c)
            if t.state != TrialState.RUNNING or t.last_step != step:
                continue
            if self.study.pruner.prune(self.study, t) and \
                    self._tell(c, state=TrialState.PRUNED):
                pruned.append(c)
        return pruned

    def finish(self, candidate: int, value: float) -> None:
        if self.trial(candidate).state == TrialState.RUNNING:
            self._tell(candidate, values=value)

    def _tell(self, candidate: int, **how) -> bool:
        """``Study.tell`` the candidate's trial; False when another worker deciding the same
        rung at the same time told it first (Optuna raises ``UpdateFinishedTrialError`` when
        that happens inside the storage's update, ``ValueError`` when ``tell`` read the
        trial already finished)."""
        try:
            self.study.tell(self.numbers[candidate], **how)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            if self.trial(candidate).state == TrialState.RUNNING:
                raise
            return False
        return True

    # -- claims: which worker does a candidate's work at a rung -----------------------------
    def claim(self, candidate: int, what) -> bool:
        """Take ``candidate``'s work ``what`` (a rung's step, or ``"export"``) for this
        process: True when it is ours now; False while a live worker holds it. A holder is
        dead when its process is gone (same host) or its lease has not been refreshed for
        ``GRACE_S`` seconds (``holding`` refreshes it). The claim is written, then read back
        ``SETTLE_S`` later: of two workers that both read the claim free, the last write
        wins, and the earlier writer reads the later one's claim and gives way, unless more
        than ``SETTLE_S`` passed between the later writer's read and its write. Then both do
        the same seeded, deterministic work, and the second report of the value is ignored
        (``report``), also when the first worker has finished the trial meanwhile. On a
        finished trial nothing can be claimed."""
        key, me = f"claim_{what}", _worker()
        held = self.trial(candidate).user_attrs.get(key)
        if held and held["worker"] != me["worker"]:
            here = held["host"] == me["host"]
            alive = pid_alive(held["pid"]) if here else time.time() - held["time"] < GRACE_S
            if alive:
                return False
        if not self.set_attr(candidate, key, me):
            return False
        time.sleep(SETTLE_S)
        held = self.trial(candidate).user_attrs.get(key)
        return bool(held) and held["worker"] == me["worker"]

    @contextmanager
    def holding(self, candidate: int, what):
        """While the block runs, the claim's lease is refreshed every ``HEARTBEAT_S`` s; after
        it (done or failed) the claim is released."""
        stop = threading.Event()

        def refresh():
            while not stop.wait(HEARTBEAT_S):
                try:
                    self.set_attr(candidate, f"claim_{what}", _worker())
                except Exception:  # noqa: BLE001 - a missed refresh only risks a takeover
                    pass

        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.set_attr(candidate, f"claim_{what}", None)

    def _tid(self, candidate: int) -> int:
        from autohybrid.search.study import trial_id

        if candidate not in self._ids:
            self._ids[candidate] = trial_id(self.storage, self.study.study_name,
                                            self.numbers[candidate])
        return self._ids[candidate]


def checkpoint_dir(out: Path, candidate: int) -> Path:
    return Path(out) / "select" / f"trial-{candidate:04d}"


# -- the stage ------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device; use auto, cpu or cuda"
                          ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU here; use --device cpu (or auto)")
    return dev


def recipe(setup, steps: int, save_every: int | None = None):
    """The fine-tune every candidate of ``setup``'s search gets (``SearchConfig.
    finetune_recipe``), ``steps`` long, images mirrored where the data allows it."""
    from autohybrid.finetune import FinetuneConfig

    return FinetuneConfig(**{**setup.cfg.finetune_recipe(), "steps": steps,
                             "flip": setup.data.mirror_invariant, "save_every": save_every})


@dataclass
class Validation:
    """The validation images of a search, their labels and the dense model's outputs."""

    images: torch.Tensor
    labels: torch.Tensor
    reference: torch.Tensor

    @classmethod
    def of(cls, setup) -> Validation:
        from autohybrid.data import as_tensors

        x, y = as_tensors(setup.splits.validation)
        with torch.no_grad():
            ref = torch.cat([setup.model(b) for b in x.split(setup.cfg.batch_size)])
        return cls(x, y, ref)

    def top1(self, small: torch.nn.Module, batch_size: int = 256) -> float:
        from autohybrid.search.objective import score_model

        small = small.cpu().eval()
        return score_model(small, self.images, self.labels, self.reference,
                           batch_size)["top1"]


def fit_candidate(setup, alloc, val: Validation) -> tuple[torch.nn.Module, dict]:
    """``alloc`` built as the search hands a candidate on: layers sequentially refit to the
    calibration images (when the search fits to data), BatchNorm recalibration on or off
    chosen on the validation images. Returns the model and its validation scores
    (``bn_recal``: which)."""
    from autohybrid.apply import DenseInputs, apply, fit_settings
    from autohybrid.search.objective import score_with_bn_choice

    ev = setup.evaluator
    calibration = ev.images if ev.fits_data else None
    if calibration is not None and setup.dense_inputs is None \
            and fit_settings(alloc)["sequential"]:
        searched = [la.name for la in setup.ps.space.compressible(setup.inv)]
        setup.dense_inputs = DenseInputs(setup.model, searched, calibration)
    small = apply(setup.model, alloc, inv=setup.inv, progress=False, calibration=calibration,
                  dense_inputs=setup.dense_inputs)
    chosen = score_with_bn_choice(small, val.images, val.labels, val.reference, ev.bn_recal,
                                  ev.recal_images, ev.batch_size, setup.cfg.quality,
                                  recal_with=ev.images)
    return small, chosen


def test_top1(setup, small: torch.nn.Module, device=None) -> float:
    """Top-1 on ``setup``'s test split: reported, never chosen on."""
    from autohybrid.evaluate import evaluate

    return evaluate(small.to(device or "cpu"), setup.test, progress=False)["top1"]


class Selection:
    """Successive halving over the pool of ``setup``'s study (``run_selection``)."""

    def __init__(self, setup, pool: list[FrozenTrial], lad: Ladder):
        self.setup, self.cfg, self.ladder, self.pool = setup, setup.cfg, lad, pool
        self.out = Path(self.cfg.out)
        self.by_number = {t.number: t for t in pool}
        self.device = resolve_device(self.cfg.device)
        # a checkpoint every quarter of the first rung: a kill loses little of any rung
        self.ft = recipe(setup, lad.full, save_every=max(1, lad.steps[1] // 4)) \
            if lad.full else None  # --finetune-budget 0: nothing is fine-tuned
        self.val = Validation.of(setup)
        self.teacher = setup.model if self.device.type == "cpu" else \
            copy.deepcopy(setup.model).to(self.device)
        self.stage = SelectionStudy(setup.storage, setup.study_name, pool, lad,
                                    {"finetune": self.ft and self.ft.to_dict(),
                                     "val": len(setup.splits.validation)})
        self.models: dict[int, torch.nn.Module] = {}

    # one candidate
    def alloc(self, c: int):
        from autohybrid.allocation import Allocation

        return Allocation.load(self.out / allocation_file(c),
                               self.setup.inv)

    def deploy_alloc(self, c: int):
        """Candidate ``c``'s allocation with, under a latency table, each layer's fastest
        measured form (``load(path, deploy=True)`` runs in them)."""
        alloc = self.alloc(c)
        table = self.setup.ps.latency
        if table is not None:
            from autohybrid.latency import best_forms

            key = table.key
            alloc.meta["deploy"] = {
                "runtime": key["runtime"], "threads": key["threads"], "batch": key["batch"],
                "machine": key["machine"],
                "forms": best_forms(table, self.setup.inv, alloc.layers)}
        return alloc

    def fitted(self, c: int) -> torch.nn.Module:
        """Candidate ``c`` as handed on by the search (``fit_candidate``)."""
        small, chosen = fit_candidate(self.setup, self.alloc(c), self.val)
        if self.stage.trial(c).user_attrs.get("bn_recal") is None:
            self.stage.set_attr(c, "bn_recal", chosen["bn_recal"])
            self.stage.set_attr(c, f"val_{self.cfg.quality}", chosen[self.cfg.quality])
        return small

    def model(self, c: int) -> torch.nn.Module:
        if c not in self.models:
            self.models[c] = self.fitted(c)
        return self.models[c]

    def val_top1(self, small: torch.nn.Module) -> float:
        return self.val.top1(small, self.cfg.batch_size)

    def tune(self, c: int, step: int) -> torch.nn.Module:
        """Candidate ``c``'s fine-tune continued to ``step`` (from its checkpoint)."""
        from autohybrid.finetune import finetune

        small = self.model(c)
        if step > 0:
            finetune(small.to(self.device), self.teacher, self.setup.splits.finetune, self.ft,
                     checkpoint_dir=checkpoint_dir(self.out, c), progress=True, stop_at=step)
        return small

    def test_top1(self, small: torch.nn.Module) -> float:
        return test_top1(self.setup, small, self.device)

    # the ladder
    def run(self) -> int:
        """All rungs (what the stage study already holds is kept); returns the winner."""
        from autohybrid.progress import console

        lad, stage = self.ladder, self.stage
        for k, step in enumerate(lad.steps):
            entering = stage.live()
            console.print(f"rung {k} of {len(lad.steps) - 1}: {len(entering)} candidate(s), "
                          f"{step} fine-tune step(s) each")
            self.rung(entering, step, first=k == 0)
            if lad.keep(k) is not None:
                pruned = stage.decide(entering, step)
                for c in pruned:
                    self.models.pop(c, None)
                kept = [c for c in entering if c not in pruned]
                if pruned:
                    console.print(f"  kept trial(s) {_list(kept)}; pruned {_list(pruned)}")
        return self.winner()

    def winner(self) -> int:
        """The one candidate left once every rung is decided."""
        (winner,) = self.stage.live()
        return winner

    def rung(self, entering: list[int], step: int, first: bool) -> None:
        """Until every candidate of ``entering`` reported its validation top-1 at ``step``:
        claim one no other live worker holds and do it, or wait for the others."""
        from autohybrid.progress import console

        stage, waiting = self.stage, False
        while todo := [c for c in entering if not stage.reported(c, step)]:
            c = next((c for c in self.prefer(todo) if stage.claim(c, step)), None)
            if c is None:
                if not waiting:
                    console.print(f"  waiting for other workers: trial(s) {_list(todo)}")
                waiting = True
                time.sleep(POLL_S)
                continue
            waiting = False
            with stage.holding(c, step):
                if stage.reported(c, step):  # its former holder finished it meanwhile
                    continue
                small = self.tune(c, step)
                if first and "test_top1_before" not in stage.trial(c).user_attrs:
                    stage.set_attr(c, "test_top1_before", self.test_top1(small))
                value = self.val_top1(small)
                stage.report(c, step, value)
            console.print(f"  trial {c}: validation top-1 {value:.2f} % after {step} "
                          "step(s)")

    def prefer(self, todo: list[int]) -> list[int]:
        """``todo`` with the candidates this worker holds a fine-tune checkpoint of first:
        the worker that ran a candidate's last rung continues it."""
        from autohybrid.finetune import CHECKPOINT_NAME

        mine = [c for c in todo if (checkpoint_dir(self.out, c) / CHECKPOINT_NAME).is_file()]
        return mine + [c for c in todo if c not in mine]

    def export_winner(self, winner: int) -> None:
        """The winner fine-tuned to the end, its test top-1, and its model in ``models/``
        (done once: other workers wait for it, then export to their own ``--out`` only when
        it is not the same folder)."""
        from autohybrid.export import export

        stage = self.stage
        path = self.out / "models" / f"trial-{winner:04d}"
        while True:
            t = stage.trial(winner)
            if "test_top1_after" in t.user_attrs and path.is_dir():
                break
            if not stage.claim(winner, "export"):
                time.sleep(POLL_S)
                continue
            with stage.holding(winner, "export"):
                small = self.tune(winner, self.ladder.full)
                top1 = self.test_top1(small)
                export(small.cpu(), self.deploy_alloc(winner), path)
                stage.set_attr(winner, "test_top1_after", top1)
                stage.set_attr(winner, "model", f"models/trial-{winner:04d}")
            break
        stage.finish(winner, stage.trial(winner).intermediate_values[self.ladder.full])

    def rows(self) -> list[dict]:
        """A row per candidate: the search's scores, validation top-1 at every rung reached,
        the rung it left at, and for the one returned its test top-1 and its model."""
        q = self.cfg.quality
        rows = []
        for c, st in sorted(self.stage.trials().items(),
                            key=lambda ct: self.stage.study.user_attrs["pool"].index(ct[0])):
            row = search_row(self.by_number[c], q)
            row.update(bn_recal=st.user_attrs.get("bn_recal"),
                       test_top1_before=st.user_attrs.get("test_top1_before"))
            for step in self.ladder.steps:
                row[f"val_top1_step_{step}"] = st.intermediate_values.get(step)
            row["returned"] = st.state == TrialState.COMPLETE
            row["test_top1_after"] = st.user_attrs.get("test_top1_after")
            row["allocation"] = allocation_file(c)
            row["model"] = st.user_attrs.get("model")
            rows.append(row)
        return rows


def search_row(t: FrozenTrial, quality: str) -> dict:
    """What the search knows of trial ``t``: its scores on the calibration images, its cost,
    its methods and where it came from."""
    return {"trial": t.number, quality: t.values[0], "top1_calibration": t.user_attrs.get("top1"),
            "params_fraction": t.user_attrs["params_fraction"],
            "macs_fraction": t.user_attrs["macs_fraction"], "family": family(t),
            "origin": _origin(t), "allocation": allocation_file(t.number)}


def _worker() -> dict:
    """This process as the holder of a claim: host, pid, and the time of the claim."""
    host, pid = socket.gethostname(), os.getpid()
    return {"worker": f"{host}:{pid}", "host": host, "pid": pid, "time": time.time()}


def _list(cs: list[int]) -> str:
    return ", ".join(map(str, cs)) or "none"


def _origin(t: FrozenTrial) -> str:
    from autohybrid.search.study import origin

    return origin(t)
