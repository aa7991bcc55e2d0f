"""``svd``: Linear and 1x1 conv -> two layers through rank r (truncated SVD)."""

from __future__ import annotations

import torch
from torch import nn

from autohybrid.fit import whitened_lowrank
from autohybrid.inventory import LayerInfo
from autohybrid.methods.base import LowRankMethod, register


def svd_factors(matrix: torch.Tensor, r: int, cache: dict | None = None) -> list[torch.Tensor]:
    """[first (r, in), second (out, r)] with the singular values split evenly between them.

    The full SVD is kept in ``cache`` so every rank of the same matrix reuses it.
    """
    cache = {} if cache is None else cache
    if "svd" not in cache:
        cache["svd"] = torch.linalg.svd(matrix.double(), full_matrices=False)
    u, s, vh = cache["svd"]
    root = s[:r].sqrt()
    first = root[:, None] * vh[:r]
    second = u[:, :r] * root[None, :]
    return [first.to(matrix.dtype), second.to(matrix.dtype)]


@register
class SVD(LowRankMethod):
    name = "svd"
    color = "#ff7f0e"

    def applies_to(self, layer):
        return layer.kind in ("linear", "pointwise")

    def max_rank(self, layer):
        return (min(layer.in_chs, layer.out_chs),)

    def lowrank_params(self, layer, rank):
        return rank[0] * (layer.in_chs + layer.out_chs)

    def lowrank_macs(self, layer, rank):
        return layer.positions * rank[0] * (layer.in_chs + layer.out_chs)

    def chain(self, layer: LayerInfo, rank, bias):
        (r,) = rank
        if not layer.is_conv:
            return nn.Sequential(
                nn.Linear(layer.in_chs, r, bias=False), nn.Linear(r, layer.out_chs, bias=bias)
            )
        return nn.Sequential(
            nn.Conv2d(layer.in_chs, r, 1, layer.stride, layer.padding, bias=False),
            nn.Conv2d(r, layer.out_chs, 1, bias=bias),
        )

    def decompose(self, weight, layer, rank, cache=None):
        return svd_factors(weight.reshape(layer.out_chs, layer.in_chs), rank[0], cache)

    def fit_factors(self, target, metric, layer, rank, cache=None):
        """Truncation in the whitened space (SVD-LLM): the optimal rank-r output fit, so the
        factor next to the output needs no refit."""
        matrix = target.double().reshape(layer.out_chs, layer.in_chs)
        first, second = whitened_lowrank(matrix, metric, rank[0], cache)
        return [first, second]

    def reconstruct(self, factors, layer):
        first, second = (f.reshape(f.shape[0], -1) for f in factors)
        return (second @ first).reshape(layer.weight_shape)
