"""The modules a compressed model is made of: plain torch ops, trainable, ONNX-exportable.

Low-rank forms are ``nn.Sequential`` chains of ``nn.Conv2d`` / ``nn.Linear``; only the sparse
branch and the tensor-train matrix need a module of their own, and both are built from
ordinary differentiable ops (scatter, matmul), with no custom autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autohybrid.inventory import LayerInfo

__all__ = ["SparseConv2d", "SparseLinear", "TTLinear", "LowRankSparse", "sparse_module"]


class _SparseBase(nn.Module):
    """A weight stored as its nonzero ``values`` at flat ``indices``; parameters == nonzeros."""

    def __init__(self, shape: Sequence[int], nnz: int, bias: bool):
        super().__init__()
        self.shape = tuple(shape)
        self.values = nn.Parameter(torch.zeros(nnz))
        self.register_buffer("indices", torch.zeros(nnz, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(shape[0])) if bias else None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def load_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.indices.copy_(indices)
            self.values.copy_(values)

    def weight(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        w = self.values.new_zeros(numel).scatter(0, self.indices, self.values)
        return w.view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, bias={self.bias is not None}"


class SparseConv2d(_SparseBase):
    def __init__(self, layer: LayerInfo, nnz: int, bias: bool):
        super().__init__(layer.weight_shape, nnz, bias)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class SparseLinear(_SparseBase):
    def __init__(self, layer: LayerInfo, nnz: int, bias: bool):
        super().__init__(layer.weight_shape, nnz, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def sparse_module(layer: LayerInfo, nnz: int, bias: bool) -> _SparseBase:
    return (SparseConv2d if layer.is_conv else SparseLinear)(layer, nnz, bias)


class TTLinear(nn.Module):
    """A linear layer whose weight is a tensor-train matrix, applied core by core.

    ``cores[k]`` has shape (r_k, o_k, i_k, r_{k+1}) with r_0 = r_d = 1. The full
    (out, in) matrix is never formed: each step is one matmul over (r_k * i_k).
    """

    def __init__(
        self,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        ranks: Sequence[int],
        bias: bool,
    ):
        super().__init__()
        self.in_factors, self.out_factors = tuple(in_factors), tuple(out_factors)
        full = (1, *ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(full[k], o, i, full[k + 1]))
            for k, (o, i) in enumerate(zip(self.out_factors, self.in_factors))
        )
        self.in_features, self.out_features = math.prod(in_factors), math.prod(out_factors)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        t = x.reshape(-1, 1, self.in_factors[0], self.in_features // self.in_factors[0])
        for k, core in enumerate(self.cores):
            m, r, i, rest = t.shape
            _, o, _, r_next = core.shape
            t = t.permute(0, 3, 1, 2).reshape(m * rest, r * i)
            t = t @ core.permute(0, 2, 1, 3).reshape(r * i, o * r_next)
            t = t.reshape(m, rest, o, r_next).permute(0, 2, 3, 1)
            if k + 1 < len(self.cores):
                i_next = self.in_factors[k + 1]
                t = t.reshape(m * o, r_next, i_next, rest // i_next)
        out = t.reshape(*lead, self.out_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        ranks = tuple(c.shape[-1] for c in self.cores[:-1])
        return f"in={self.in_factors}, out={self.out_factors}, ranks={ranks}"


class LowRankSparse(nn.Module):
    """W = L + S: the low-rank chain and the sparse branch run in parallel and are summed."""

    def __init__(self, lowrank: nn.Module, sparse: nn.Module):
        super().__init__()
        self.lowrank = lowrank
        self.sparse = sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x) + self.sparse(x)
