"""``cp``: kxk conv -> CP-rank-r pipeline 1x1, depthwise kx1, depthwise 1xk, 1x1.

CP-ALS through tensorly (Lebedev et al. 2015). Rank ratio 1.0 is the break-even rank, where
the factors hold as many parameters as the dense weight.
"""

from __future__ import annotations

import warnings

import torch
from tensorly.decomposition import parafac
from torch import nn

from autohybrid.methods.base import LowRankMethod, register


@register
class CP(LowRankMethod):
    name = "cp"
    color = "#9467bd"

    def applies_to(self, layer):
        return layer.kind == "conv"

    def max_rank(self, layer):
        kh, kw = layer.kernel_size
        dense = layer.in_chs * layer.out_chs * kh * kw
        return (max(1, dense // (layer.in_chs + layer.out_chs + kh + kw)),)

    def lowrank_params(self, layer, rank):
        kh, kw = layer.kernel_size
        return rank[0] * (layer.in_chs + kh + kw + layer.out_chs)

    def lowrank_macs(self, layer, rank):
        (r,), (kh, kw) = rank, layer.kernel_size
        (hi, wi), (ho, wo) = layer.in_hw, layer.out_hw
        return r * (hi * wi * layer.in_chs + ho * wi * kh + ho * wo * kw + ho * wo * layer.out_chs)

    def chain(self, layer, rank, bias):
        (r,), (kh, kw) = rank, layer.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
        return nn.Sequential(
            nn.Conv2d(layer.in_chs, r, 1, bias=False),
            nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False),
            nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False),
            nn.Conv2d(r, layer.out_chs, 1, bias=bias),
        )

    def decompose(self, weight, layer, rank, cache=None):
        w = weight.detach().double().numpy()
        with warnings.catch_warnings():  # svd init pads ranks above a mode size: expected
            warnings.simplefilter("ignore", UserWarning)
            cp = parafac(w, rank[0], init="svd", n_iter_max=50, tol=1e-7, random_state=0)
        weights, (a_out, a_in, a_h, a_w) = cp
        dt = weight.dtype
        t = lambda a: torch.from_numpy(a.copy()).to(dt)  # noqa: E731
        return [
            t(a_in.T),  # (r, C_in)
            t(a_h.T),  # (r, kh)
            t(a_w.T),  # (r, kw)
            t(a_out * weights[None, :]),  # (C_out, r)
        ]

    def reconstruct(self, factors, layer):
        a_in, a_h, a_w, a_out = (f.reshape(f.shape[0], -1) for f in factors)
        return torch.einsum("or,ri,rk,rl->oikl", a_out, a_in, a_h, a_w)
