"""``tucker2``: kxk conv -> 1x1 (C_in -> r1), kxk (r1 -> r2), 1x1 (r2 -> C_out).

Tucker decomposition of the two channel modes (Kim et al. 2016) by truncated HOSVD: the
leading left singular vectors of the output- and input-channel unfoldings. The two SVDs are
computed once per weight and serve every rank pair.
"""

from __future__ import annotations

import torch
from tensorly.tenalg import multi_mode_dot
from torch import nn

from autohybrid.methods.base import LowRankMethod, register


def _mode_bases(w: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    cache = {} if cache is None else cache
    if "tucker2" not in cache:
        w = w.double()
        u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0]
        u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0]
        cache["tucker2"] = (u_out, u_in)
    return cache["tucker2"]


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
                r1, r2, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
            ),
            nn.Conv2d(r2, layer.out_chs, 1, bias=bias),
        )

    def decompose(self, weight, layer, rank, cache=None):
        r1, r2 = rank
        u_out, u_in = _mode_bases(weight.detach(), cache)
        u_out, u_in = u_out[:, :r2], u_in[:, :r1]
        w = weight.detach().double()
        core = multi_mode_dot(w.numpy(), [u_out.T.numpy(), u_in.T.numpy()], modes=[0, 1])
        dt = weight.dtype
        return [u_in.T.to(dt), torch.from_numpy(core).to(dt), u_out.to(dt)]

    def reconstruct(self, factors, layer):
        first, core, last = factors
        first = first.reshape(first.shape[0], -1)
        last = last.reshape(last.shape[0], -1)
        return torch.einsum("or,rskl,si->oikl", last, core, first)
