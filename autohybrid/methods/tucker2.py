"""``tucker2``: kxk conv -> 1x1 (C_in -> r1), kxk (r1 -> r2), 1x1 (r2 -> C_out).

Tucker decomposition of the two channel modes (Kim et al. 2016), through tensorly.
"""

from __future__ import annotations

import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from autohybrid.methods.base import LowRankMethod, register


@register
class Tucker2(LowRankMethod):
    name = "tucker2"

    def applies_to(self, layer):
        return layer.kind == "conv"

    def max_rank(self, layer):
        return (layer.in_chs, layer.out_chs)

    def lowrank_params(self, layer, rank):
        r1, r2 = rank
        kh, kw = layer.kernel_size
        return layer.in_chs * r1 + r1 * r2 * kh * kw + r2 * layer.out_chs

    def lowrank_macs(self, layer, rank):
        r1, r2 = rank
        kh, kw = layer.kernel_size
        (hi, wi), out = layer.in_hw, layer.positions
        return hi * wi * layer.in_chs * r1 + out * (r1 * r2 * kh * kw + r2 * layer.out_chs)

    def chain(self, layer, rank, bias):
        r1, r2 = rank
        return nn.Sequential(
            nn.Conv2d(layer.in_chs, r1, 1, bias=False),
            nn.Conv2d(
                r1,
                r2,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                bias=False,
            ),
            nn.Conv2d(r2, layer.out_chs, 1, bias=bias),
        )

    def decompose(self, weight, layer, rank):
        r1, r2 = rank
        w = weight.detach().double().numpy()
        if (r1, r2) == self.max_rank(layer):
            core, u_out, u_in = w, torch.eye(r2).numpy(), torch.eye(r1).numpy()
        else:
            (core, (u_out, u_in)), _ = partial_tucker(
                w, rank=[r2, r1], modes=[0, 1], init="svd", n_iter_max=5
            )
        dt = weight.dtype
        return [
            torch.from_numpy(u_in.T.copy()).to(dt),  # (r1, C_in)
            torch.from_numpy(core.copy()).to(dt),  # (r2, r1, kh, kw)
            torch.from_numpy(u_out.copy()).to(dt),  # (C_out, r2)
        ]

    def reconstruct(self, factors, layer):
        first, core, last = factors
        first = first.reshape(first.shape[0], -1)
        last = last.reshape(last.shape[0], -1)
        return torch.einsum("or,rskl,si->oikl", last, core, first)
