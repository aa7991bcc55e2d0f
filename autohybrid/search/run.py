"""``autohybrid search``: model -> sensitivity -> study -> candidates -> halving -> export.

Each stage is a function that reads and writes files in ``cfg.out``, so it can be rerun or
called alone (``benchmarks/`` do): ``setup_search`` (statistics, sensitivity), ``run_study``
(``study.db``), ``write_front`` (``allocations/``), ``run_selection`` (the candidates halved
over fine-tune steps on the validation split, the winner in ``models/``), ``write_pareto``
(``pareto.csv``) and ``write_search_report`` (``report.html``). Every stage skips what a
rerun finds done, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd
import torch

from autohybrid.allocation import Allocation
from autohybrid.config import SearchConfig
from autohybrid.exceptions import BudgetError, ConfigError
from autohybrid.inventory import inventory, model_input_size
from autohybrid.io import atomic_path, atomic_write_text, remove_stale_temps
from autohybrid.progress import console
from autohybrid.search.console import TrialProgress, print_front
from autohybrid.search.objective import Evaluator
from autohybrid.search.params import LEVELS, MIN_SCALE, ParamSpace, group_layers
from autohybrid.search.select import (
    SELECT_SUFFIX,
    Ladder,
    Selection,
    allocation_file,
    candidate_pool,
    ladder_of,
    resolve_device,
    search_row,
)
from autohybrid.search.speed import measure_speed, within_measured
from autohybrid.search.study import (
    SearchStudy,
    fit_meta,
    origin,
    pareto_front,
    trial_layers,
)
from autohybrid.search.surrogate import Surrogate
from autohybrid.search.warm_start import warm_starts
from autohybrid.search_space import load_search_space
from autohybrid.sensitivity import sensitivity
from autohybrid.stats import input_stats
from autohybrid.storage import get_storage, mask_url

if TYPE_CHECKING:  # the annotations only: data and sensitivity load lazily
    from autohybrid.data import DataBundle, Splits
    from autohybrid.inventory import Inventory
    from autohybrid.sensitivity import SensitivityTable
    from autohybrid.stats import LayerStats

__all__ = ["run_search", "setup_search", "run_study", "write_front", "write_allocations",
           "run_selection", "write_pareto", "load_model", "SearchSetup", "smallest_fraction"]

def smallest_fraction(ps: ParamSpace) -> float:
    """The cheapest model the search space can build (every layer at its cheapest)."""
    layers = {}
    for g in ps.groups:
        for name in g.layers:
            best = None
            for m in g.methods[1:]:
                spec = ps.spec(ps.inv[name], m, LEVELS[-1] * MIN_SCALE, 0.5)
                cost = ps.fraction({name: spec})
                if best is None or cost < best[0]:
                    best = (cost, spec)
            if best:
                layers[name] = best[1]
    return ps.fraction(layers)


@dataclass
class SearchSetup:
    """What the study stage starts from: the model, its data, the sensitivity table and
    input statistics, the parameter space, the evaluator and the warm starts."""

    cfg: SearchConfig
    model: torch.nn.Module
    size: tuple[int, int, int]
    data: DataBundle
    splits: Splits  # calibration, validation, fine-tune: disjoint
    inv: Inventory
    table: SensitivityTable
    stats: LayerStats | None  # with the data fit
    ps: ParamSpace
    evaluator: Evaluator
    warm: dict
    storage: optuna.storages.BaseStorage
    study_name: str
    # the dense model's layer inputs on the calibration images, shared by every candidate's
    # sequential fit (``apply.DenseInputs``; made by the first ``select.fit_candidate``)
    dense_inputs: object = field(default=None, repr=False)

    @property
    def test(self):
        """The test split (its first ``cfg.test_limit`` images when set): reported only."""
        test = self.data.test
        if self.cfg.test_limit:
            test = torch.utils.data.Subset(test, range(min(self.cfg.test_limit, len(test))))
        return test

    @property
    def identity(self) -> dict:
        return {"name": self.cfg.model, "num_classes": self.inv.num_classes,
                "input_size": list(self.size), "kwargs": dict(self.inv.model_kwargs)}


def check_reachable(ps: ParamSpace, budget: float) -> float:
    """The smallest fraction ``ps`` can build; ``BudgetError`` naming it when ``budget`` is
    below."""
    low = smallest_fraction(ps)
    if budget < low:
        raise BudgetError(
            f"budget {budget} of {ps.metric} cannot be reached by this search space: "
            f"the smallest reachable fraction is {low:.3f}; raise --budget or widen the space"
        )
    return low


def load_model(cfg: SearchConfig) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The dense model of ``cfg`` in eval mode, and its input size."""
    from autohybrid.models import create_model

    if cfg.model is None:
        raise ConfigError("no model to search: give --model and --checkpoint, or start from "
                          "the built-in demo's config (autohybrid.demo.demo_config())")
    model = create_model(cfg.model, num_classes=cfg.num_classes, checkpoint=cfg.checkpoint,
                         **cfg.model_args).eval()
    size = tuple(cfg.input_size) if cfg.input_size else model_input_size(model)
    return model, size


def latency_table(cfg: SearchConfig, model, inv, space):
    """The per-layer latency table of ``model`` on ``cfg.runtime``: measured once per
    machine, runtime, threads, input size and batch, kept in the user cache
    (``$AUTOHYBRID_CACHE/latency``, default ``~/.cache/autohybrid/latency``) for every later
    search of this model, and resumed when interrupted."""
    from autohybrid.demo import cache_dir
    from autohybrid.latency import measure_table

    threads = cfg.threads or torch.get_num_threads()
    console.rule(f"latency table: {cfg.runtime}, {threads} thread(s), batch "
                 f"{cfg.latency_batch}")
    table = measure_table(model, inv, space, runtime=cfg.runtime, threads=threads,
                          batch=cfg.latency_batch, folder=cache_dir() / "latency",
                          probe=cfg.budget * (1.0 - cfg.latency_margin))
    table.margin = cfg.latency_margin
    console.print(f"dense model {1e3 * table.model_s:.2f} ms; table measured in "
                  f"{table.seconds:.0f} s; in-model calibration alpha "
                  f"{', '.join(f'{m} {a:.2f}' for m, a in table.alphas.items()) or 1.0} "
                  f"(probed at {table.alpha_at:g}); the search aims {cfg.latency_margin:.0%} "
                  "under the budget (--latency-margin)")
    return table


def setup_search(cfg: SearchConfig) -> SearchSetup:
    """Stage 1: model, data, input statistics (``sensitivity/stats-*.safetensors``) and the
    sensitivity table (``sensitivity/``), the layer groups, the evaluator, the warm starts.
    Checks that the budget is reachable before anything is computed."""
    from autohybrid.data import as_tensors, load_data
    from autohybrid.report import write_sensitivity_report

    cfg.validate()
    resolve_device(cfg.device)  # a GPU asked for and absent fails before any work
    out = Path(cfg.out)
    model, size = load_model(cfg)
    data = load_data(cfg.data, model, input_size=size)
    inv = inventory(model, size)
    space = load_search_space(cfg.model, cfg.search_space)
    if cfg.metric == "latency":
        space = space.for_latency()
    latency = latency_table(cfg, model, inv, space) if cfg.metric == "latency" else None
    check_reachable(ParamSpace(space, inv, group_layers(space, inv, None, 10**9, 0),
                               cfg.metric, latency), cfg.budget)
    val = cfg.val if cfg.val is not None else min(1000, len(data.train) // 5)
    splits = data.splits(cfg.calib, val, seed=cfg.seed)  # too small a split: before any file
    storage = get_storage(cfg.storage, out)  # fail early on a bad URL
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # half-written files of a killed earlier run
    cfg.save(out / "config.yaml")
    x, y = as_tensors(splits.calibration)
    fit = fit_meta(cfg)
    layers = [la.name for la in space.compressible(inv)]
    key = {"data": cfg.data, "seed": cfg.seed}
    stats = None
    if cfg.fit == "data":
        console.rule(f"input statistics: {len(layers)} layers, {len(x)} calibration images")
        stats = input_stats(model, inv, layers, x, out_dir=out / "sensitivity", key_extra=key)
    console.rule(f"sensitivity: {len(layers)} layers of {cfg.model}")
    table = sensitivity(model, inv, space, x, y, out_dir=out / "sensitivity", key_extra=key,
                        batch_size=cfg.batch_size, bn_recal=_recal(cfg.bn_recal),
                        recal_images=cfg.recal_images, stats=stats, fit=fit)
    write_sensitivity_report(table, out / "sensitivity",
                             cfg.quality if cfg.quality == "kl" else "dloss")
    groups = group_layers(space, inv, table.df, cfg.max_groups, cfg.seed)
    ps = ParamSpace(space, inv, groups, cfg.metric, latency)
    evaluator = Evaluator(model, inv, x, y, _trial_recal(cfg.bn_recal), cfg.recal_images,
                          cfg.batch_size, stats=stats, fit=fit, quality=cfg.quality)
    warm = warm_starts(ps, table.df, model, cfg.budget, stats)
    study_name = cfg.study_name or f"{cfg.model}-{cfg.metric}-{cfg.budget:g}"
    return SearchSetup(cfg, model, size, data, splits, inv, table, stats, ps, evaluator, warm,
                       storage, study_name)


def run_study(setup: SearchSetup) -> optuna.Study:
    """Stage 2: the study (``study.db`` or ``--storage``) to ``cfg.trials`` evaluated trials
    within the budget, on the Optuna loop or on Ray Tune; resumes a stored study."""
    cfg, out = setup.cfg, Path(setup.cfg.out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says it all
    console.rule(f"search: study {setup.study_name!r} in {mask_url(_storage_name(cfg, out))}, "
                 f"{len(setup.ps.groups)} groups, {cfg.sampler}, {cfg.trials} trials")
    surrogate = Surrogate(setup.table.df, setup.inv)
    if cfg.backend == "ray":
        from autohybrid.search.ray_backend import run_ray

        return run_ray(cfg, setup.storage, setup.study_name, setup.ps, setup.evaluator,
                       surrogate, setup.identity, setup.warm)
    ss = SearchStudy(cfg, setup.storage, setup.study_name, setup.ps, setup.evaluator,
                     surrogate, setup.identity)
    ss.open(setup.warm)
    with TrialProgress(cfg) as progress:
        ss.on_trial = progress.update
        ss.run()
    ss.wait_for_others()  # every worker goes on with the same trials
    return ss.study


def run_search(cfg: SearchConfig) -> Path:
    """The whole pipeline, stage by stage; returns the output folder. Each stage keeps what
    it wrote, so a rerun resumes where an interrupted one stopped."""
    from autohybrid.search.report import write_search_report

    t0 = time.time()
    out = Path(cfg.out)
    setup = setup_search(cfg)
    study = run_study(setup)
    trials = study.get_trials(deepcopy=False)
    front = pareto_front(trials, cfg.budget)
    if not front:
        n = len(trials)
        hint = ("or lower --latency-margin " if cfg.metric == "latency" else "")
        raise BudgetError(
            f"none of the study's {n} trials is within the budget {cfg.budget:g} of "
            f"{cfg.metric} (the warm starts and every repair fell short); raise --budget "
            f"{hint}or widen the search space")
    write_allocations(study, front, out)  # the front's files (``write_front``), once
    rows, lad = run_selection(setup, study)
    if cfg.speed:
        rows = measure_speed(setup, rows)
    write_pareto(rows, out)
    write_search_report(study, out, cfg, setup.table, setup.inv, lad)
    console.print(f"done in {time.time() - t0:.0f} s: {out}/pareto.csv, {out}/report.html")
    print_front(rows)
    return out


def _recal(v: str):
    return "auto" if v == "auto" else str(v).lower() in ("on", "true", "1")


def _trial_recal(v: str):
    """Per trial: ``auto`` scores with and without BatchNorm recalibration, keeps the better."""
    return "choose" if v == "auto" else _recal(v)


def _storage_name(cfg, out):
    return cfg.storage or f"sqlite:///{out / 'study.db'}"


def write_front(study: optuna.Study, out: Path, budget: float | None) -> list:
    """allocations/trial-NNNN.yaml for every Pareto trial of ``study``."""
    front = pareto_front(study.get_trials(deepcopy=False), budget)
    write_allocations(study, front, out)
    return front


def write_allocations(study: optuna.Study, trials: list, out: Path) -> None:
    """allocations/trial-NNNN.yaml for each of ``trials``: the allocation file a user
    re-applies (with the data fit's settings and calibration sample, when data-fitted)."""
    attrs = study.user_attrs
    fit = dict(attrs.get("fit") or {"mode": "weights"})
    for t in trials:
        layers = trial_layers(t)
        meta_fit = {}
        if fit.get("mode") == "data":
            layers = {n: replace(s, fit="data") for n, s in layers.items()}
            meta_fit = {"fit": {k: v for k, v in fit.items() if k != "mode"},
                        "calibration": {"data": attrs.get("data"), "n": attrs.get("calib"),
                                        "seed": attrs.get("seed")}}
        alloc = Allocation(
            layers=layers, fingerprint=attrs["fingerprint"],
            model=dict(attrs.get("model", {})), budget=attrs.get("budget"),
            metric=attrs.get("metric"),
            meta={"study": study.study_name, "trial": t.number,
                  "quality": {attrs.get("quality", "kl"): t.values[0]},
                  "top1_calibration": t.user_attrs.get("top1"),
                  "warm_start": t.user_attrs.get("warm_start"), "origin": origin(t),
                  "bn_recal": t.user_attrs.get("bn_recal"), **meta_fit},
        )
        alloc.save(out / allocation_file(t.number))


def run_selection(setup, study: optuna.Study) -> tuple[list[dict], Ladder]:
    """Stage 3: the pool of ``study``, halved over fine-tune steps on the validation split;
    the winner exported to ``models/``. Returns a row per candidate (``Selection.rows``)."""
    cfg = setup.cfg
    trials = study.get_trials(deepcopy=False)
    pool = candidate_pool(trials, cfg.budget, cfg.candidates) if cfg.candidates else []
    if not pool:  # --candidates 0: no selection, the front as the search scored it
        return [search_row(t, cfg.quality) for t in pareto_front(trials, cfg.budget)], None
    write_allocations(study, pool, Path(cfg.out))
    if setup.ps.latency is not None:  # what is returned must measure within the budget
        stored = stored_pool(setup, study)  # another worker measured it first: its pool
        pool = within_measured(setup, pool) if stored is None else \
            [t for t in pool if t.number in stored]
    lad = ladder_of(cfg, len(pool), len(setup.splits.finetune))
    console.rule(f"select: {len(pool)} candidates, rungs at {list(lad.steps)} fine-tune "
                 f"steps (eta {lad.eta}, {lad.cost} steps in all), validation "
                 f"{len(setup.splits.validation)} images")
    sel = Selection(setup, pool, lad)
    if cfg.backend == "ray":  # the stage's work on Ray tasks, the same protocol
        from autohybrid.search.ray_backend import select_on_ray

        winner = select_on_ray(sel)
    else:
        winner = sel.run()
    sel.export_winner(winner)
    return sel.rows(), lad



def stored_pool(setup, study: optuna.Study) -> list[int] | None:
    """The pool the selection stage of ``study`` already holds (a worker that got there
    first, or an interrupted run), None when the stage has not started."""
    name = setup.study_name + SELECT_SUFFIX
    if name not in optuna.get_all_study_names(setup.storage):
        return None
    return optuna.load_study(study_name=name, storage=setup.storage).user_attrs.get("pool")


def write_pareto(rows: list[dict], out: Path) -> None:
    """``pareto.csv`` and ``pareto.json``: the candidates as fitted, their validation top-1 at
    every rung, and the test top-1 of the one returned."""
    with atomic_path(out / "pareto.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    atomic_write_text(out / "pareto.json", json.dumps(rows, indent=2))


