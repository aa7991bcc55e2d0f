"""``tucker2``: kxk conv -> 1x1 (C_in -> r1), kxk (r1 -> r2), 1x1 (r2 -> C_out).

Tucker decomposition of the two channel modes (Kim et al. 2016) by truncated HOSVD: the
leading left singular vectors of the output- and input-channel unfoldings. The two SVDs are
computed once per weight and serve every rank pair.
"""

from __future__ import annotations

import torch
from tensorly.tenalg import multi_mode_dot
from torch import nn

from autohybrid.fit import output_error, reduced_rank
from autohybrid.methods.base import LowRankMethod, register


def _data_bases(w: torch.Tensor, metric: torch.Tensor, cache: dict | None) -> list[torch.Tensor]:
    """Candidate input-channel bases (full width; the first r1 rows serve rank r1): the weight's
    own input-mode singular vectors, and those of the weight whitened by the input channels'
    second moment ``Hc`` (the patch moment summed over kernel positions), whitening undone."""
    cache = {} if cache is None else cache
    if "tucker2_data" not in cache:
        out, cin, kh, kw = w.shape
        w = w.double()
        plain = torch.linalg.svd(w.transpose(0, 1).reshape(cin, -1), full_matrices=False)[0].T
        h = metric[0].reshape(cin, kh * kw, cin, kh * kw)
        hc = h.diagonal(dim1=1, dim2=3).sum(-1)
        t = torch.linalg.cholesky(0.5 * (hc + hc.T))
        white = torch.einsum("oikl,ij->jokl", w, t).reshape(cin, -1)
        v = torch.linalg.svd(white, full_matrices=False)[0]
        whitened = torch.linalg.solve_triangular(t, v.T, upper=False, left=False)
        cache["tucker2_data"] = [plain, whitened]
    return cache["tucker2_data"]


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
    color = "#2ca02c"

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

    def fit_factors(self, target, metric, layer, rank, cache=None):
        """For each candidate input basis (``_data_bases``) the optimal core and output factor
        by reduced-rank regression (``autohybrid.fit.reduced_rank``); the better fit wins.
        The plain basis makes the result at least as good as the weight fit's, in the data."""
        r1, r2 = rank
        kh, kw = layer.kernel_size
        t = target.double().reshape(layer.out_chs, -1)
        eye = torch.eye(kh * kw, dtype=torch.float64)
        best = None
        for basis in _data_bases(target, metric, cache):
            first = basis[:r1].contiguous()
            proj = torch.kron(first, eye)  # (r1*kk, in*kk): the 1x1 conv on patches
            a, b = reduced_rank(t, metric, proj, r2)
            err = output_error(t - b @ a @ proj, metric)
            if best is None or err < best[0]:
                best = (err, [first, a.reshape(r2, r1, kh, kw), b])
        return best[1]

    def reconstruct(self, factors, layer):
        first, core, last = factors
        first = first.reshape(first.shape[0], -1)
        last = last.reshape(last.shape[0], -1)
        return torch.einsum("or,rskl,si->oikl", last, core, first)
