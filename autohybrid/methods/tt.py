"""``tt``: Linear -> tensor-train matrix (Novikov et al. 2015), applied core by core.

``in`` and ``out`` are each split into ``d`` balanced factors (d = len(rank) + 1, 3 by
default); the TT-SVD comes from tensorly.
"""

from __future__ import annotations

import math

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix

from autohybrid.exceptions import MethodError
from autohybrid.fit import spd_solve
from autohybrid.layers import TTLinear
from autohybrid.methods.base import LowRankMethod, register

DEFAULT_CORES = 3


def tt_factors(n: int, d: int) -> tuple[int, ...] | None:
    """Split ``n`` into ``d`` factors >= 2 as equal as possible (sorted), or None."""
    primes, k, m = [], 2, n
    while k * k <= m:
        while m % k == 0:
            primes.append(k)
            m //= k
        k += 1
    if m > 1:
        primes.append(m)
    if len(primes) < d:
        return None
    buckets = [1] * d
    for p in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return tuple(sorted(buckets))


def tt_shape(layer, d: int):
    return tt_factors(layer.in_chs, d), tt_factors(layer.out_chs, d)


def tt_cores(layer, d: int) -> int:
    """The number of cores used for ``layer``: ``d`` if it factorizes, else fewer."""
    for k in range(d, 1, -1):
        fi, fo = tt_shape(layer, k)
        if fi and fo:
            return k
    return 0


@register
class TT(LowRankMethod):
    name = "tt"
    color = "#8c564b"

    def applies_to(self, layer):
        return layer.kind == "linear" and tt_cores(layer, DEFAULT_CORES) >= 2

    def max_rank(self, layer, d: int | None = None):
        d = d or tt_cores(layer, DEFAULT_CORES)
        fi, fo = tt_shape(layer, d)
        sizes = [o * i for o, i in zip(fo, fi)]
        return tuple(
            min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(d - 1)
        )

    def full_rank_for(self, layer, rank):
        d = len(rank) + 1
        fi, fo = tt_shape(layer, d) if d >= 2 else (None, None)
        if not (fi and fo):
            raise MethodError(
                f"tt with {len(rank)} rank(s) needs in={layer.in_chs} and out={layer.out_chs} "
                f"to split into {d} factors >= 2; give {tt_cores(layer, DEFAULT_CORES) - 1} ranks"
            )
        return self.max_rank(layer, d)

    def _steps(self, layer, rank):
        """(rows, r*i, o*r_next) of each core's matmul, per sample."""
        d = len(rank) + 1
        fi, fo = tt_shape(layer, d)
        full = (1, *rank, 1)
        steps, m, rest = [], layer.positions, layer.in_chs // fi[0]
        for k in range(d):
            steps.append((m * rest, full[k] * fi[k], fo[k] * full[k + 1]))
            m *= fo[k]
            if k + 1 < d:
                rest //= fi[k + 1]
        return steps

    def lowrank_params(self, layer, rank):
        d = len(rank) + 1
        fi, fo = tt_shape(layer, d)
        full = (1, *rank, 1)
        return sum(full[k] * fo[k] * fi[k] * full[k + 1] for k in range(d))

    def lowrank_macs(self, layer, rank):
        return sum(a * b * c for a, b, c in self._steps(layer, rank))

    def chain(self, layer, rank, bias):
        fi, fo = tt_shape(layer, len(rank) + 1)
        return TTLinear(fi, fo, rank, bias)

    def decompose(self, weight, layer, rank, cache=None):
        d = len(rank) + 1
        fi, fo = tt_shape(layer, d)
        w = weight.detach().double().numpy().reshape(*fo, *fi)
        tt = tensor_train_matrix(w, rank=[1, *rank, 1])
        return [torch.from_numpy(c.copy()).to(weight.dtype) for c in tt.factors]

    def refit_last(self, factors, target, metric, layer):
        """The last core by exact least squares for the others fixed. With ``L[(o_a, i_a), r]``
        the product of the first d-1 cores, ``W[(o_a, o_d), (i_a, i_d)] = sum_r L G[r, o_d,
        i_d]`` is linear in the last core ``G`` and every ``o_d`` shares one normal matrix
        ``K[(r, j), (s, l)] = sum L[o_a, a, r] H[(a, j), (b, l)] L[o_a, b, s]``."""
        d = len(factors)
        fi, fo = tt_shape(layer, d)
        lead = factors[0][0]  # (o1, i1, r1)
        for core in factors[1:-1]:
            a, b, _ = lead.shape
            _, o, i, r_next = core.shape
            lead = torch.einsum("abr,rois->aobis", lead, core).reshape(a * o, b * i, r_next)
        oa, ia, r = lead.shape
        od, id_ = fo[-1], fi[-1]
        h = metric[0].reshape(ia, id_, ia, id_)
        left = torch.einsum("oar,ajbl->orjbl", lead, h)
        k = torch.einsum("orjbl,obs->rjsl", left, lead).reshape(r * id_, r * id_)
        q = (target.reshape(layer.out_chs, -1) @ metric[0]).reshape(oa, od, ia, id_)
        rhs = torch.einsum("oar,odaj->rjd", lead, q).reshape(r * id_, od)
        g = spd_solve(0.5 * (k + k.T), rhs).reshape(r, id_, od)
        return [*factors[:-1], g.permute(0, 2, 1).unsqueeze(-1).contiguous()]

    def reconstruct(self, factors, layer):
        cores = [f.double().numpy() for f in factors]
        full = tl.tt_matrix.tt_matrix_to_tensor(cores)
        return torch.from_numpy(full.copy()).to(factors[0].dtype).reshape(layer.weight_shape)
