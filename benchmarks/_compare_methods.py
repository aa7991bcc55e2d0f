"""The rows ``compare.py`` puts side by side in one (model, metric, budget) cell.

Three kinds, every one built by the package's own stages:

- ``search``: ``autohybrid search`` itself (``run_search``: statistics, sensitivity, the
  study, the candidate pool halved over fine-tune steps on the validation split, the winner
  fine-tuned and exported), on the model's search space or on that space cut to one method
  family (``restrict``);
- ``fixed``: one allocation a user would try instead (a warm start of the search's own
  setup, uniform low-rank, or ``torch.nn.utils.prune`` global magnitude), built as the search
  hands a candidate on (``select.fit_candidate``) and fine-tuned with the same recipe for the
  whole fine-tune budget the search's ladder spends;
- ``control``: the dense model, same recipe and steps (what the fine-tune does to the model
  it starts from).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from torch.nn.utils import prune

from autohybrid.allocation import search_level
from autohybrid.cost import allocation_cost
from autohybrid.exceptions import BudgetError
from autohybrid.methods import HYBRID, METHODS, LowRankMethod
from autohybrid.search_space import SearchSpace
from autohybrid.spec import LayerSpec

LOWRANK_METHODS = frozenset(n for n, m in METHODS.items() if isinstance(m, LowRankMethod))
assert HYBRID not in LOWRANK_METHODS


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # search | fixed | control
    space: frozenset[str] | None = None  # search: the methods kept (None: the whole space)
    warm: str | None = None  # fixed: the warm start of the search's setup it is
    fit: str | None = None  # fixed: "weights" forces the weight fit (default: the search's)


ROWS = {
    "autohybrid": Row("autohybrid search (L+S)", "search"),
    "searched_sparse": Row("searched, sparse only", "search", frozenset({"sparse"})),
    "searched_lowrank": Row("searched, low-rank only", "search", LOWRANK_METHODS),
    "global_magnitude": Row("global magnitude (torch prune, weights as pruned)", "fixed",
                            fit="weights"),
    "global_saliency": Row("global OBS saliency (SparseGPT-style, data fit)", "fixed",
                           warm="global_saliency_obs"),
    "global_magnitude_fit": Row("global magnitude sparsities, data fit", "fixed",
                                warm="global_magnitude"),
    "uniform_ls": Row("uniform L+S, data fit", "fixed", warm="uniform"),
    "uniform_lowrank": Row("uniform low-rank, data fit", "fixed"),
    "greedy": Row("greedy by KL (AIMET-style), data fit", "fixed", warm="greedy"),
    "error_threshold": Row("error threshold (ALDS-style), data fit", "fixed",
                           warm="error_threshold"),
    "dense_finetuned": Row("control: the dense model, same fine-tune", "control"),
}


def restrict(space: SearchSpace, keep: frozenset[str] | None) -> SearchSpace:
    """``space`` with each layer kind's candidate methods cut to ``keep`` (None: unchanged)."""
    if keep is None:
        return space
    methods = {k: [m for m in ms if m in keep] for k, ms in space.methods.items()}
    return dataclasses.replace(space, name=f"{space.name}-restricted",
                               methods={k: v for k, v in methods.items() if v})


def fixed_layers(name: str, setup) -> tuple[dict[str, LayerSpec] | None, str]:
    """Row ``name``'s per-layer specs on ``setup`` (a ``SearchSetup``), or None and why."""
    row = ROWS[name]
    if row.warm is not None:
        layers = setup.warm.get(row.warm)
        return layers, "" if layers else f"the warm start {row.warm!r} cannot meet the budget"
    if name == "uniform_lowrank":
        return uniform_lowrank(setup)
    if name == "global_magnitude":
        return torch_global_magnitude(setup)
    raise KeyError(name)


def uniform_lowrank(setup) -> tuple[dict[str, LayerSpec] | None, str]:
    """One keep level for every layer with the space's factorization for its kind (else its
    first allowed low-rank method; layers with none stay dense), binary-searched to the
    budget with the package's ``search_level``."""
    ps, space = setup.ps, setup.ps.space

    def pick(layer):
        allowed = space.methods.get(layer.kind, [])
        order = [space.factorizations.get(layer.kind), *allowed]
        return next((m for m in order if m in LOWRANK_METHODS and m in allowed
                     and METHODS[m].applies_to(layer)), None)

    def build(layer, x):
        m = pick(layer)
        return ps.spec(layer, m, x) if m else LayerSpec()

    try:
        specs, level = search_level(ps.inv, build, setup.cfg.budget, ps.metric,
                                    layers=space.compressible(ps.inv))
    except BudgetError as e:
        return None, str(e)
    return {n: s for n, s in specs.items() if s.method != "dense"}, f"level {level:.4f}"


def torch_global_magnitude(setup) -> tuple[dict[str, LayerSpec] | None, str]:
    """``prune.global_unstructured`` (L1) over the searched layers; the amount binary-searched
    (fewest pruned weights whose allocation fits); each layer's mask then becomes a
    ``sparse`` spec with exactly its zero count (the weight fit keeps the largest |w| of a
    layer, which is the global mask's restriction to it)."""
    model, inv, budget = setup.model, setup.inv, setup.cfg.budget
    names = [la.name for la in setup.ps.space.compressible(inv)
             if "sparse" in setup.ps.space.methods.get(la.kind, [])]
    total = sum(inv[n].weight_numel for n in names)

    def specs(amount: int) -> dict[str, LayerSpec]:
        m = copy.deepcopy(model)
        params = [(m.get_submodule(n), "weight") for n in names]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        out = {}
        for n in names:
            mask = m.get_submodule(n).weight_mask
            zeros = int((mask == 0).sum())
            if zeros:
                out[n] = LayerSpec("sparse", sparsity=zeros / mask.numel())
        return out

    def fits(amount: int) -> bool:
        return allocation_cost(inv, specs(amount)).fraction(setup.ps.metric) <= budget

    if not names or not fits(total - 1):
        return None, "pruning every weight but one still exceeds the budget"
    lo, hi = 0, total - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return specs(lo), f"{lo} of {total} weights pruned"
