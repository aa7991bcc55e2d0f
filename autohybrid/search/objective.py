"""Measuring one allocation: build it, score it with and without BatchNorm recalibration.

The Evaluator keeps the dense model, the calibration tensors, the dense reference logits and a
cache of compressed layers (the same layer spec recurs across trials), so a trial costs one
model build from cached parts plus two passes over the calibration images (one with the
BatchNorm statistics as they are, one after re-estimating them) and one recalibration pass.

With input statistics (``autohybrid.stats``) every layer is fitted to its outputs on the
calibration data, independently per layer from the dense model's inputs: that fit is cached
per (layer, spec) like the weight fit. The sequential fit (``autohybrid.apply``) is kept for
the results the search hands on, where it is worth its cost.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict

import torch
from torch import nn

from autohybrid.apply import replace_module
from autohybrid.evaluate import Scores, recalibrate_bn
from autohybrid.exceptions import AutohybridError
from autohybrid.inventory import Inventory
from autohybrid.methods.base import build
from autohybrid.spec import LayerSpec

__all__ = ["Evaluator", "NumericalError", "score_model", "score_with_bn_choice"]


class NumericalError(AutohybridError):
    """A compressed model produced NaN or inf (extreme compression)."""


class Evaluator:
    """Scores allocations on the calibration images.

    Args:
        bn_recal: ``True`` / ``False`` forces BatchNorm recalibration on or off for every
            trial; ``"choose"`` scores both and keeps the better per trial (``bn_recal`` in
            the scores says which).
        stats: input statistics of the dense model on ``images``; with them every layer is
            fitted to the data (``fit``: damping and saliency), else to its weights.
        quality: the score the BatchNorm choice minimises.
    """

    def __init__(
        self,
        model: nn.Module,
        inv: Inventory,
        images: torch.Tensor,
        labels: torch.Tensor,
        bn_recal: bool | str,
        recal_images: int = 256,
        batch_size: int = 256,
        cache_size: int = 2048,
        stats=None,
        fit: dict | None = None,
        quality: str = "kl",
    ):
        self.model, self.inv = model.eval(), inv
        self.images, self.labels = images, labels
        self.bn_recal, self.recal_images, self.batch_size = bn_recal, recal_images, batch_size
        self.stats, self.fit, self.quality = stats, dict(fit or {}), quality
        self._cache: OrderedDict = OrderedDict()
        self._svd: dict[tuple, dict] = {}
        self._problems: dict[str, object] = {}
        self.cache_size = cache_size
        with torch.no_grad():
            self.reference = torch.cat([model(x) for x in images.split(batch_size)])

    @property
    def fits_data(self) -> bool:
        return self.stats is not None

    def problem(self, name: str):
        if name not in self._problems:
            from autohybrid.fit import DAMP, SALIENCY, problem_from_stats

            w = self.model.get_submodule(name).weight
            self._problems[name] = problem_from_stats(
                w, self.stats.h[name], self.fit.get("damp", DAMP),
                self.fit.get("saliency", SALIENCY))
        return self._problems[name]

    def layer(self, name: str, spec: LayerSpec) -> tuple[nn.Module, float]:
        if self.fits_data and spec.method != "dense":
            spec = dataclasses.replace(spec, fit="data")
        key = (name, spec)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        dense = self.model.get_submodule(name)
        bias = dense.bias.detach() if dense.bias is not None else None
        problem = self.problem(name) if spec.fit == "data" else None
        built = build(dense.weight.detach(), bias, self.inv[name], spec, problem,
                      self._svd.setdefault((name, spec.fit), {}))
        self._cache[key] = built
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return built

    def build(self, layers: dict[str, LayerSpec]) -> tuple[nn.Module, dict[str, float]]:
        """The compressed model (a copy; compressed layers come from the cache)."""
        small = copy.deepcopy(self.model)
        errors = {}
        for name, spec in layers.items():
            module, err = self.layer(name, spec)
            replace_module(small, name, copy.deepcopy(module))
            errors[name] = err
        return small.eval(), errors

    @torch.no_grad()
    def score(self, layers: dict[str, LayerSpec]) -> dict:
        small, errors = self.build(layers)
        out = score_with_bn_choice(small, self.images, self.labels, self.reference,
                                   self.bn_recal, self.recal_images, self.batch_size,
                                   self.quality)
        out["mean_rel_error"] = sum(errors.values()) / max(len(errors), 1)
        if not all(math.isfinite(v) for v in out.values()):
            raise NumericalError(f"non-finite scores {out}")
        return out


@torch.no_grad()
def score_model(small: nn.Module, images, labels, reference, batch_size: int = 256) -> dict:
    """Calibration scores of ``small`` against the labels and the dense ``reference`` logits."""
    scores = Scores()
    small.eval()
    for i, x in enumerate(images.split(batch_size)):
        lo = i * batch_size
        logits = small(x)
        if not torch.isfinite(logits).all():
            raise NumericalError("the compressed model produced NaN/inf outputs")
        scores.add(logits, labels[lo : lo + len(x)], reference[lo : lo + len(x)])
    out = scores.as_dict()
    out["disagreement"] = 100.0 - out["agreement"]
    return out


@torch.no_grad()
def score_with_bn_choice(
    small: nn.Module, images, labels, reference, bn_recal: bool | str = "choose",
    recal_images: int = 256, batch_size: int = 256, quality: str = "kl",
    recal_with: torch.Tensor | None = None,
) -> dict:
    """Score ``small`` on ``images`` as built and, where it has BatchNorm and ``bn_recal`` is
    ``"choose"`` or on, after re-estimating its statistics on the first ``recal_images`` of
    ``recal_with`` (default: ``images``; the selection stage scores on validation images and
    recalibrates on calibration ones); keep (in ``small`` too) the better by ``quality``.
    ``bn_recal`` in the result: which."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.modules())
    plain = None
    if bn_recal is not True or not has_bn:
        plain = score_model(small, images, labels, reference, batch_size)
        if bn_recal is False or not has_bn:
            return {**plain, "bn_recal": False}
    before = copy.deepcopy(small.state_dict()) if plain is not None else None
    x = (images if recal_with is None else recal_with)[:recal_images]
    recalibrate_bn(small, torch.utils.data.TensorDataset(x, torch.zeros(len(x))),
                   batches=None, batch_size=batch_size, progress=False)
    try:
        recal = score_model(small, images, labels, reference, batch_size)
    except NumericalError:
        if plain is None:
            raise
        recal = None
    if plain is not None and (recal is None or plain[quality] <= recal[quality]):
        small.load_state_dict(before)
        return {**plain, "bn_recal": False}
    return {**recal, "bn_recal": True}
