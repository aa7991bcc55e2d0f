"""Measuring one allocation: build it, optionally recalibrate BatchNorm, score on calibration.

The Evaluator keeps the dense model, the calibration tensors, the dense reference logits and a
cache of compressed layers (the same layer spec recurs across trials), so a trial costs one
model build from cached parts plus one pass over the calibration images.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn

from autohybrid.apply import replace_module
from autohybrid.evaluate import recalibrate_bn
from autohybrid.exceptions import AutohybridError
from autohybrid.inventory import Inventory
from autohybrid.methods import get_method
from autohybrid.sensitivity import Scores
from autohybrid.spec import LayerSpec

__all__ = ["Evaluator", "NumericalError"]


class NumericalError(AutohybridError):
    """A compressed model produced NaN or inf (extreme compression)."""


class Evaluator:
    def __init__(
        self,
        model: nn.Module,
        inv: Inventory,
        images: torch.Tensor,
        labels: torch.Tensor,
        bn_recal: bool,
        recal_images: int = 256,
        batch_size: int = 256,
        cache_size: int = 2048,
    ):
        self.model, self.inv = model.eval(), inv
        self.images, self.labels = images, labels
        self.bn_recal, self.recal_images, self.batch_size = bn_recal, recal_images, batch_size
        self._cache: OrderedDict = OrderedDict()
        self._svd: dict[str, dict] = {}
        self.cache_size = cache_size
        with torch.no_grad():
            self.reference = torch.cat([model(x) for x in images.split(batch_size)])

    def layer(self, name: str, spec: LayerSpec) -> tuple[nn.Module, float]:
        key = (name, spec)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        dense = self.model.get_submodule(name)
        bias = dense.bias.detach() if dense.bias is not None else None
        built = get_method(spec.method).compress(
            dense.weight.detach(), bias, self.inv[name], spec, self._svd.setdefault(name, {})
        )
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
        if self.bn_recal:
            x = self.images[: self.recal_images]
            recalibrate_bn(small, torch.utils.data.TensorDataset(x, torch.zeros(len(x))),
                           batches=None, batch_size=self.batch_size, progress=False)
        scores = Scores()
        for i, x in enumerate(self.images.split(self.batch_size)):
            lo = i * self.batch_size
            logits = small(x)
            if not torch.isfinite(logits).all():
                raise NumericalError("the compressed model produced NaN/inf outputs")
            scores.add(logits, self.labels[lo : lo + len(x)], self.reference[lo : lo + len(x)])
        out = scores.as_dict()
        out["disagreement"] = 100.0 - out["agreement"]
        out["mean_rel_error"] = sum(errors.values()) / max(len(errors), 1)
        if not all(math.isfinite(v) for v in out.values()):
            raise NumericalError(f"non-finite scores {out}")
        return out
