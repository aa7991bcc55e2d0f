"""Warm starts: the allocations every user would try first, enqueued as the study's first trials.

- ``uniform``: one keep level for every layer, low-rank + sparse (sparse where low-rank
  does not apply), binary-searched to the budget; in a mixed space also per method family
  (``uniform_sparse``, ``uniform_lowrank``).
- ``greedy`` (AIMET-style): per layer, the cheapest candidate whose measured sensitivity is
  below one threshold; the threshold is binary-searched so the model meets the budget.
- ``global_magnitude``: one magnitude threshold across all searched layers (global
  unstructured pruning); each layer's sparsity is what that threshold implies.
- ``error_threshold`` (ALDS-style): like greedy, on the relative reconstruction error.
- ``global_saliency_obs`` / ``global_saliency_wanda`` (with input statistics): global pruning
  by activation-aware saliency, the data-fit counterpart of global magnitude.
Each returns per-layer specs, or None when it cannot reach the budget. Every start keeps to
the methods the search space allows each layer: a sparse-only space gets a uniform sparse
start and no low-rank anywhere.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from autohybrid.allocation import search_level
from autohybrid.exceptions import BudgetError
from autohybrid.methods import HYBRID, LOWRANK, family
from autohybrid.methods.sparse import SALIENCY_KINDS
from autohybrid.search.params import ParamSpace
from autohybrid.sensitivity import spec_from_row
from autohybrid.spec import LayerSpec

__all__ = ["warm_starts", "uniform", "threshold", "global_magnitude", "global_saliency",
           "global_threshold"]


def _allowed(ps: ParamSpace) -> dict[str, tuple[str, ...]]:
    """Layer name -> the methods the search space allows it (never ``dense``)."""
    return {name: tuple(m for m in g.methods if m != "dense")
            for g in ps.groups for name in g.layers}


def uniform(ps: ParamSpace, budget: float, only: str | None = None):
    """One level everywhere: low-rank + sparse where the space allows it, else sparse, else
    the layer's first allowed low-rank method. With ``only`` (a method family: ``sparse``,
    ``LOWRANK`` or ``HYBRID``), each layer's first allowed method of that family, and the
    layers with none stay dense."""
    allowed = _allowed(ps)
    if only is not None:
        allowed = {n: tuple(m for m in ms if family(m) == only) for n, ms in allowed.items()}
    layers = [la for la in ps.space.compressible(ps.inv) if allowed.get(la.name)]
    if not layers:
        return None

    def method(name: str) -> str:
        ms = allowed[name]
        return next((m for m in (HYBRID, "sparse") if m in ms), ms[0])

    try:
        specs, _ = search_level(ps.inv, lambda la, x: ps.spec(la, method(la.name), x), budget,
                                ps.metric, layers=layers, latency=ps.latency)
    except BudgetError:
        return None
    return {n: s for n, s in specs.items() if s.method != "dense"}


def threshold(ps: ParamSpace, table: pd.DataFrame, column: str, budget: float):
    """Per layer the cheapest candidate with ``column`` <= tau; tau binary-searched.
    Cheapest in the budget's metric: a tensor-train Linear holds few params and many MACs."""
    options = {}
    for name, rows in table.groupby("layer", sort=False):
        if ps.metric == "latency":  # the table's predicted seconds, then params
            rows = rows.assign(latency=[ps.layer_cost(ps.inv[name], spec_from_row(r))
                                        for _, r in rows.iterrows()])
        rows = rows.sort_values([ps.metric, "params" if ps.metric != "params" else "macs"],
                                kind="stable")
        options[name] = [(float(r[column]), spec_from_row(r)) for _, r in rows.iterrows()]

    def at(tau: float) -> dict[str, LayerSpec]:
        out = {}
        for name, opts in options.items():
            ok = [s for v, s in opts if v <= tau]
            if ok:
                out[name] = ok[0]
        return out

    taus = np.unique(table[column].to_numpy(float))
    if len(taus) == 0 or ps.fraction(at(taus[-1])) > budget:
        return None
    lo, hi = 0, len(taus) - 1  # smallest tau index that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if ps.fraction(at(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return at(taus[lo])


def global_magnitude(ps: ParamSpace, model: torch.nn.Module, budget: float):
    """One |w| threshold over every searched layer the space lets be sparse, sparsity per
    layer as it implies."""
    layers = _sparse_layers(ps)
    scores = {la.name: model.get_submodule(la.name).weight.detach().abs().flatten()
              for la in layers}
    return global_threshold(ps, scores, budget)


def global_saliency(ps: ParamSpace, model: torch.nn.Module, stats, budget: float,
                    kind: str | None = None):
    """Global pruning by activation-aware saliency (``autohybrid.fit.saliency``, OBS or Wanda)
    instead of |w|: each layer's scores are divided by its output energy per row, so they are
    relative output errors and comparable across layers (Wanda's score is squared first, so it
    is in squared output units as OBS's is). One threshold, as global magnitude."""
    from autohybrid.fit import output_error, problem_from_stats, saliency

    scores = {}
    for la in _sparse_layers(ps):
        if la.name not in stats:
            return None
        w = model.get_submodule(la.name).weight.detach()
        problem = problem_from_stats(w, stats.h[la.name])
        wm = problem.matrix()
        energy = output_error(wm, problem.raw) / wm.shape[0]
        score = saliency(problem, wm, kind)
        if (kind or problem.saliency) == "wanda":  # |w|·sqrt(H_jj): squared, as OBS's units
            score = score**2
        scores[la.name] = (score / max(energy, 1e-300)).flatten()
    return global_threshold(ps, scores, budget)


def _sparse_layers(ps: ParamSpace):
    allowed = _allowed(ps)
    return [la for la in ps.space.compressible(ps.inv) if "sparse" in allowed.get(la.name, ())]


def global_threshold(ps: ParamSpace, scores: dict[str, torch.Tensor], budget: float):
    """One threshold over per-layer scores; a layer's sparsity is the share below it. The
    fewest pruned weights that fit the budget (binary search), or None if none fits."""
    if not scores:
        return None
    all_w = torch.cat(list(scores.values())).sort().values

    def at(k: int) -> dict[str, LayerSpec]:
        t = all_w[min(k, len(all_w) - 1)]
        out = {}
        for name, w in scores.items():
            zeros = int((w < t).sum())
            if zeros:
                out[name] = LayerSpec("sparse", sparsity=min(zeros / w.numel(), 0.9999))
        return out

    lo, hi = 0, len(all_w) - 1  # fewest pruned weights that fit
    if ps.fraction(at(hi)) > budget:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ps.fraction(at(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return at(lo)


def warm_starts(ps: ParamSpace, table: pd.DataFrame, model, budget: float,
                stats=None) -> dict[str, dict]:
    """name -> per-layer specs, for every warm start that can meet the budget.

    Where the space mixes method families, greedy, error threshold and uniform also run on
    each family alone (``greedy_sparse``, ``error_threshold_lowrank``, ``uniform_sparse``...):
    one threshold over all candidates can land far from the best single-family allocation
    (ResNet-56 at 0.2 of the MACs: every mixed start was worse than the sparse-only error
    threshold, and the search kept a sampled, chance-level trial), and a space holds every
    start of the spaces cut to one of its families (ResNet-20 at 0.1 of the params, data
    fit: the sparse-only search returned uniform sparse, 69.31 %, the mixed one 66.44 %
    before it had that start). Identical allocations are kept once."""
    starts = {
        "uniform": uniform(ps, budget),
        "greedy": threshold(ps, table, "kl", budget),
        "global_magnitude": global_magnitude(ps, model, budget),
        "error_threshold": threshold(ps, table, "rel_error", budget),
    }
    if stats is not None:  # data-fitted layers: global saliency (both kinds) beside magnitude
        for kind in SALIENCY_KINDS:
            starts[f"global_saliency_{kind}"] = global_saliency(ps, model, stats, budget, kind)
    fams = table.method.map(family) if len(table) else pd.Series(dtype=str)
    if fams.nunique() > 1:
        # single-family first (the mixed rule had its go), named sparse / lowrank / hybrid
        for fam, label in (("sparse", "sparse"), (LOWRANK, "lowrank"), (HYBRID, "hybrid")):
            rows = table[fams == fam]
            if len(rows):
                starts[f"greedy_{label}"] = threshold(ps, rows, "kl", budget)
                starts[f"error_threshold_{label}"] = threshold(ps, rows, "rel_error", budget)
                starts[f"uniform_{label}"] = uniform(ps, budget, fam)
    out: dict[str, dict] = {}
    for k, v in starts.items():
        if v is not None and v not in out.values():
            out[k] = v
    return out

