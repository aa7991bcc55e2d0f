"""apply(model, allocation) -> a new model of plain torch layers, compressed as allocated.

Layers whose spec says ``fit: data`` are fitted to their outputs on calibration images
(``autohybrid.fit``), sequentially in forward order: each layer's inputs come from the model
compressed so far, its targets from the dense model's outputs at that layer, so every fit
corrects what the layers before it lost. Without calibration images those layers fall back to
the weight fit, with one warning.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from autohybrid.allocation import Allocation
from autohybrid.fit import DAMP, SALIENCY, problem_from_stats, sequential_problem
from autohybrid.inventory import Inventory, LayerInfo, inventory
from autohybrid.methods.base import build
from autohybrid.progress import bar
from autohybrid.stats import layer_rows, moment

__all__ = ["apply", "skeleton", "model_inventory", "fit_settings", "DenseInputs"]

DENSE_CACHE_BYTES = 2 << 30  # what DenseInputs may keep of the dense model's layer inputs


def model_inventory(model: nn.Module, alloc: Allocation) -> Inventory:
    """The inventory of ``model`` at the allocation's input size, with its identity."""
    own_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return inventory(
        model,
        input_size=alloc.input_size,
        model_name=own_name or alloc.model.get("name"),
        model_kwargs=alloc.model.get("kwargs"),
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fit_settings(alloc: Allocation) -> dict:
    """The data-fit settings an allocation records (``meta.fit``), defaults filled in."""
    fit = dict(alloc.meta.get("fit") or {})
    return {"damp": float(fit.get("damp", DAMP)), "saliency": str(fit.get("saliency", SALIENCY)),
            "sequential": bool(fit.get("sequential", True))}


class _Stop(Exception):
    """Raised by a hook once the layer's input is captured: the rest of the forward is moot."""


def _capture(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input module ``name`` of ``model`` receives for batch ``x`` (forward cut there)."""
    got = []

    def hook(mod, args):
        got.append(args[0])
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"layer {name!r} was not called in the forward pass")
    return got[0]


class DenseInputs:
    """The dense model's input to each of ``names``, per batch of ``images``, captured by one
    full forward pass per batch and kept, in forward order, while they fit in ``max_bytes``:
    the sequential fit then runs only the compressed model's cut forwards (half the passes),
    for every candidate fitted on the same images. A layer not kept is captured by a cut
    forward as before; either way the tensors are the same."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, names, images: torch.Tensor, batch_size: int = 64,
                 max_bytes: int = DENSE_CACHE_BYTES):
        self.images, self.batch_size = images, batch_size
        self.kept: dict[str, list[torch.Tensor]] = {}
        wanted, got = set(names), {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: got.setdefault(n, args[0].clone())) for n in wanted]
        training = model.training
        model.eval()
        used = 0
        try:
            for xb in images.split(batch_size):
                got.clear()
                model(xb)
                for n, x in got.items():  # first-call order: forward order
                    if n in self.kept or used + x.nbytes * len(images) / len(xb) <= max_bytes:
                        self.kept.setdefault(n, []).append(x)
                        used += x.nbytes
        finally:
            for h in hooks:
                h.remove()
            model.train(training)
        self.nbytes = used

    def get(self, name: str, b: int) -> torch.Tensor | None:
        batches = self.kept.get(name)
        return batches[b] if batches is not None else None


@torch.no_grad()
def sequential_moments(
    dense: nn.Module, small: nn.Module, layer: LayerInfo, images: torch.Tensor,
    batch_size: int = 64, dense_inputs: DenseInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H̃, C): ``X̃^T X̃`` and ``X̃^T X`` at ``layer`` over ``images``, ``X̃`` its inputs in
    ``small`` (compressed so far), ``X`` in ``dense`` (from ``dense_inputs`` when it holds
    them). Both models must be in eval mode."""
    h = cross = None
    for b, xb in enumerate(images.split(batch_size)):
        xd = dense_inputs.get(layer.name, b) if dense_inputs is not None else None
        rd = layer_rows(layer, xd if xd is not None else _capture(dense, layer.name, xb))
        rs = layer_rows(layer, _capture(small, layer.name, xb))
        hb, cb = moment(rs), moment(rs, rd)
        h, cross = (hb, cb) if h is None else (h + hb, cross + cb)
    return h, cross


@torch.no_grad()
def apply(
    model: nn.Module,
    alloc: Allocation,
    inv: Inventory | None = None,
    progress: bool | None = None,
    calibration: torch.Tensor | None = None,
    stats=None,
    batch_size: int = 64,
    dense_inputs: DenseInputs | None = None,
) -> nn.Module:
    """Return a compressed copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: the dense model.
        alloc: the allocation; its ``meta.fit`` sets damping, saliency and whether the data
            fit is sequential (default) or independent per layer.
        inv: the model's inventory at the allocation's input size (computed if None).
        progress: show a progress bar (None: when on a terminal).
        calibration: preprocessed calibration images (N, C, H, W) for ``fit: data`` layers.
        stats: ``autohybrid.stats.LayerStats`` of the dense model on ``calibration``, for
            the independent fit (collected when needed and not given).
        batch_size: calibration batch size of the fitting passes.
        dense_inputs: ``DenseInputs`` of ``model`` on ``calibration`` at ``batch_size``, for
            the sequential fit (computed here when not given; give one to share it between
            several allocations fitted on the same images).

    The allocation is validated against the model's inventory first. The relative error of
    every compressed layer (output error on the calibration rows for data fits, weight error
    otherwise) is kept in ``result.autohybrid_errors``.
    """
    inv = inv or model_inventory(model, alloc)
    alloc.validate(inv)
    settings = fit_settings(alloc)
    small = copy.deepcopy(model)
    errors: dict[str, float] = {}
    order = {la.name: i for i, la in enumerate(inv)}
    todo = sorted(((n, s) for n, s in alloc.layers.items() if s.method != "dense"),
                  key=lambda ns: order[ns[0]])
    wants_data = [n for n, s in todo if s.fit == "data"]
    if wants_data and calibration is None:
        warnings.warn(
            f"{len(wants_data)} layer(s) ask for fit: data but no calibration images were "
            "given; using the weight fit (pass calibration=..., or --data to the CLI)",
            stacklevel=3,  # the caller of apply (torch.no_grad wraps it)
        )
    if wants_data and calibration is not None and not settings["sequential"] and stats is None:
        from autohybrid.stats import collect_stats

        stats = collect_stats(model, inv, wants_data, calibration, batch_size, progress=False)
    if wants_data and calibration is not None and settings["sequential"]:
        if dense_inputs is None or dense_inputs.images is not calibration \
                or dense_inputs.batch_size != batch_size:
            dense_inputs = DenseInputs(model, wants_data, calibration, batch_size)
    modes = [(m, m.training) for m in (model, small)]
    try:
        for m, _ in modes:
            m.eval()
        for name, spec in bar(todo, desc="compress", leave=False, progress=progress):
            layer = inv[name]
            dense_mod = model.get_submodule(name)
            weight = dense_mod.weight.detach()
            bias = dense_mod.bias.detach() if dense_mod.bias is not None else None
            problem = None
            if spec.fit == "data" and calibration is not None:
                if settings["sequential"]:
                    h, cross = sequential_moments(model, small, layer, calibration, batch_size,
                                                  dense_inputs)
                    problem = sequential_problem(weight, h, cross, settings["damp"],
                                                 settings["saliency"])
                else:
                    problem = problem_from_stats(weight, stats.h[name], settings["damp"],
                                                 settings["saliency"])
            new, err = build(weight, bias, layer, spec, problem)
            replace_module(small, name, new)
            errors[name] = err
    finally:
        for m, training in modes:
            m.train(training)
    for name, _ in todo:
        small.get_submodule(name).train(small.training)
    small.autohybrid_errors = errors
    return small


def skeleton(model: nn.Module, alloc: Allocation, inv: Inventory | None = None) -> nn.Module:
    """``model`` with every allocated layer swapped for an uninitialised replacement of the
    right structure: what ``load`` fills from a saved state dict (no decomposition runs)."""
    from autohybrid.methods import get_method

    inv = inv or model_inventory(model, alloc)
    alloc.validate(inv)
    for name, spec in alloc.layers.items():
        if spec.method != "dense":
            replace_module(model, name, get_method(spec.method).skeleton(inv[name], spec))
    return model
