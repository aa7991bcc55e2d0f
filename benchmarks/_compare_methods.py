"""The eight allocations that ``compare.py`` puts side by side, each a function of one model
context and one (metric, budget) cell returning per-layer specs, or None with a reason.

All of them come from the package (warm starts, ``search_level``, ``run_study``) except the
global magnitude baseline, which runs ``torch.nn.utils.prune.global_unstructured`` for real and
only then expresses the resulting masks as an allocation.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd
import torch
from torch.nn.utils import prune

from autohybrid.allocation import search_level
from autohybrid.config import SearchConfig
from autohybrid.cost import allocation_cost
from autohybrid.exceptions import BudgetError
from autohybrid.methods import HYBRID, METHODS, LowRankMethod
from autohybrid.search import warm_start
from autohybrid.search.params import ParamSpace, group_layers
from autohybrid.search.run import SearchSetup, run_study, smallest_fraction
from autohybrid.search.study import pareto_front, trial_layers
from autohybrid.search_space import SearchSpace
from autohybrid.spec import LayerSpec
from autohybrid.storage import get_storage

LOWRANK_METHODS = frozenset(n for n, m in METHODS.items() if isinstance(m, LowRankMethod))
SPARSE_ONLY = frozenset({"sparse"})

# name -> (label in tables, kind); kind: search | greedy | fixed
METHOD_INFO = {
    "autohybrid": ("autohybrid (L+S, searched)", "search"),
    "searched_sparse": ("searched, sparse only", "search"),
    "searched_lowrank": ("searched, low-rank only", "search"),
    "uniform_ls": ("uniform L+S", "fixed"),
    "uniform_lowrank": ("uniform low-rank", "fixed"),
    "global_magnitude": ("global magnitude (torch prune)", "fixed"),
    "greedy": ("greedy (AIMET-style)", "greedy"),
    "error_threshold": ("error threshold (ALDS-style)", "greedy"),
}
# changes to the search tried where it did not win; run with --methods, reported when stored
VARIANT_INFO = {
    "autohybrid_tpe": ("variant: L+S searched, TPE sampler", "search"),
    "autohybrid_2x": ("variant: L+S searched, 2x trials", "search"),
    "autohybrid_g6": ("variant: L+S searched, at most 6 layer groups", "search"),
    "autohybrid_loss": ("variant: L+S searched, quality = calibration loss", "search"),
    "autohybrid_local": ("variant: L+S searched, last 30 % of trials local moves", "search"),
    "autohybrid_now": ("variant: L+S searched as the package now runs it (+ per-family "
                       "threshold starts, + local moves)", "search"),
    "dense_finetuned": ("control: the dense model, same fine-tune", "fixed"),
}


@dataclass
class Result:
    """Per-layer specs (None when the method cannot reach the cell) and what it took."""

    layers: dict[str, LayerSpec] | None
    evaluations: int = 0  # full-model evaluations on the calibration subset
    reason: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


def restrict(space: SearchSpace, keep: frozenset[str] | None) -> SearchSpace:
    """``space`` with each layer kind's candidate methods cut to ``keep`` (None: unchanged)."""
    if keep is None:
        return space
    methods = {k: [m for m in ms if m in keep] for k, ms in space.methods.items()}
    return dataclasses.replace(space, name=f"{space.name}-restricted",
                               methods={k: v for k, v in methods.items() if v})


def table_for(space: SearchSpace, inv, df: pd.DataFrame) -> pd.DataFrame:
    """Sensitivity rows of the candidates ``space`` allows (one table serves every search)."""
    keep = df.apply(lambda r: r["method"] in space.methods.get(inv[r["layer"]].kind, []), axis=1)
    return df[keep].reset_index(drop=True)


def param_space(ctx, space: SearchSpace, metric: str, df: pd.DataFrame,
                max_groups: int | None = None) -> ParamSpace:
    groups = group_layers(space, ctx.inv, df, max_groups or ctx.max_groups, ctx.seed)
    return ParamSpace(space, ctx.inv, groups, metric)


def uniform_with(ps: ParamSpace, pick: Callable, budget: float):
    """One keep level for every layer (``pick(layer)`` names its method, None leaves it dense),
    binary-searched to the budget with the package's ``search_level``."""
    def build(layer, x):
        m = pick(layer)
        return ps.spec(layer, m, x) if m else LayerSpec()

    try:
        specs, level = search_level(ps.inv, build, budget, ps.metric,
                                    layers=ps.space.compressible(ps.inv))
    except BudgetError as e:
        return None, str(e)
    return {n: s for n, s in specs.items() if s.method != "dense"}, f"level {level:.4f}"


def lowrank_pick(space: SearchSpace):
    """The space's factorization for the layer's kind if allowed and applicable, else the
    first allowed low-rank method that applies, else None (the layer stays dense)."""
    def pick(layer):
        allowed_here = space.methods.get(layer.kind, [])
        order = [space.factorizations.get(layer.kind), *allowed_here]
        return next((m for m in order if m in LOWRANK_METHODS and m in allowed_here
                     and METHODS[m].applies_to(layer)), None)
    return pick


# -- the fixed and greedy baselines ------------------------------------------------------------
def uniform_ls(ctx, metric, budget) -> Result:
    ps = param_space(ctx, ctx.space, metric, ctx.table)
    layers = warm_start.uniform(ps, budget)
    return Result(layers, reason="" if layers else "uniform L+S cannot reach the budget")


def uniform_lowrank(ctx, metric, budget) -> Result:
    ps = param_space(ctx, ctx.space, metric, ctx.table)
    layers, note = uniform_with(ps, lowrank_pick(ctx.space), budget)
    return Result(layers, reason="" if layers else note, extra={"note": note})


def greedy(ctx, metric, budget, column: str = "kl") -> Result:
    ps = param_space(ctx, ctx.space, metric, ctx.table)
    layers = warm_start.threshold(ps, ctx.table, column, budget)
    return Result(layers, reason="" if layers else f"no {column} threshold fits the budget")


def error_threshold(ctx, metric, budget) -> Result:
    return greedy(ctx, metric, budget, "rel_error")


def global_magnitude(ctx, metric, budget) -> Result:
    """``prune.global_unstructured`` (L1) over the searched layers' weights; the amount is
    binary-searched (fewest pruned weights whose allocation fits), then each layer's mask
    becomes a ``sparse`` spec with exactly its zero count."""
    names = [la.name for la in ctx.space.compressible(ctx.inv)]
    total = sum(ctx.inv[n].weight_numel for n in names)

    def masks(amount: int) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(ctx.model)
        params = [(m.get_submodule(n), "weight") for n in names]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        return {n: m.get_submodule(n).weight_mask.detach().clone() for n in names}

    def specs(ms: dict[str, torch.Tensor]) -> dict[str, LayerSpec]:
        out = {}
        for n, mk in ms.items():
            zeros = int((mk == 0).sum())
            if zeros:
                out[n] = LayerSpec("sparse", sparsity=zeros / mk.numel())
        return out

    def frac(amount: int) -> float:
        return allocation_cost(ctx.inv, specs(masks(amount))).fraction(metric)

    if frac(total - 1) > budget:
        return Result(None, reason="pruning every weight but one still exceeds the budget")
    lo, hi = 0, total - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if frac(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    ms = masks(lo)
    return Result(specs(ms), extra={"pruned_weights": lo, "searched_weights": total,
                                    "masks": ms})


# -- the searches --------------------------------------------------------------------------------
def searched(ctx, metric, budget, name: str, keep: frozenset[str] | None,
             sampler: str = "nsga2", trials_factor: int = 1,
             max_groups: int | None = None, quality: str = "kl",
             local_search: float = 0.0) -> Result:
    """The package's study (NSGA-II, budget repair, warm starts, surrogate screening) on the
    space restricted to ``keep``, stored in ``ctx.db``; the best within-budget trial wins.
    ``local_search`` is 0 for every row but the variant that measures it: the stored rows
    were run before the package had local moves, and a row's settings must not drift."""
    space = restrict(ctx.space, keep)
    df = table_for(space, ctx.inv, ctx.table)
    max_groups = max_groups or ctx.max_groups
    ps = param_space(ctx, space, metric, df, max_groups)
    low = smallest_fraction(ps)
    if budget < low:
        return Result(None, reason=f"smallest fraction this space reaches is {low:.3f}")
    # the package's starts keep to the restricted space's methods (the stored restricted rows
    # were run before that fix, with the same starts filtered and a uniform one added here)
    warm = warm_start.warm_starts(ps, df, ctx.model, budget)
    cfg = SearchConfig(model=ctx.name, budget=budget, metric=metric,
                       trials=ctx.trials * trials_factor, calib=ctx.calib, seed=ctx.seed,
                       max_groups=max_groups, data=ctx.data_spec, sampler=sampler,
                       quality=quality, local_search=local_search)
    storage = get_storage(f"sqlite:///{ctx.db(metric, budget, name).resolve()}", ctx.out)
    # the package's study stage on this benchmark's own setup (restricted space and table)
    setup = SearchSetup(cfg=cfg, model=ctx.model, size=tuple(ctx.size), data=None,
                        splits=None, inv=ctx.inv, table=SimpleNamespace(df=df), stats=None,
                        ps=ps, evaluator=ctx.evaluator, warm=warm, storage=storage,
                        study_name=name)
    trials = run_study(setup).get_trials(deepcopy=False)
    front = pareto_front(trials, budget)
    if not front:
        return Result(None, reason="no trial within the budget")
    best = front[0]
    return Result(
        trial_layers(best),
        evaluations=sum("kl" in t.user_attrs for t in trials),
        extra={"trial": best.number, "warm_start": best.user_attrs.get("warm_start"),
               "trials_total": len(trials),
               "screened": sum(bool(t.user_attrs.get("screened")) for t in trials),
               "over_budget": sum(bool(t.user_attrs.get("infeasible")) for t in trials),
               "warm_starts": sorted(warm), "groups": len(ps.groups),
               "local_of": best.user_attrs.get("local_of"),
               "local_moves": [t.user_attrs["local_move"] for t in trials
                               if "local_move" in t.user_attrs],
               f"calib_{quality}_best": best.values[0]},
    )


ALLOCATORS: dict[str, Callable] = {
    "autohybrid": lambda c, m, b: searched(c, m, b, "autohybrid", None),
    "searched_sparse": lambda c, m, b: searched(c, m, b, "searched_sparse", SPARSE_ONLY),
    "searched_lowrank": lambda c, m, b: searched(c, m, b, "searched_lowrank",
                                                 LOWRANK_METHODS),
    "uniform_ls": uniform_ls,
    "uniform_lowrank": uniform_lowrank,
    "global_magnitude": global_magnitude,
    "greedy": greedy,
    "error_threshold": error_threshold,
    "autohybrid_tpe": lambda c, m, b: searched(c, m, b, "autohybrid_tpe", None, sampler="tpe"),
    "autohybrid_2x": lambda c, m, b: searched(c, m, b, "autohybrid_2x", None, trials_factor=2),
    "autohybrid_g6": lambda c, m, b: searched(c, m, b, "autohybrid_g6", None, max_groups=6),
    "autohybrid_loss": lambda c, m, b: searched(c, m, b, "autohybrid_loss", None, quality="loss"),
    "autohybrid_local": lambda c, m, b: searched(c, m, b, "autohybrid_local", None,
                                                 local_search=0.3),
    # the same, after warm_starts gained the per-family threshold starts (later than the
    # autohybrid_local rows: a stored row keeps the starts it was run with)
    "autohybrid_now": lambda c, m, b: searched(c, m, b, "autohybrid_now", None,
                                               local_search=0.3),
    # what the fine-tune recipe alone does to the uncompressed network (ignores the budget)
    "dense_finetuned": lambda c, m, b: Result({}, extra={"control": True}),
}
assert set(ALLOCATORS) == set(METHOD_INFO) | set(VARIANT_INFO)
assert HYBRID not in LOWRANK_METHODS
