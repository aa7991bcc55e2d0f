"""``sparse``: magnitude pruning, unstructured or N:M, stored as values + indices; and
``block-sparse``: whole RxC blocks of the (out, in) matrix kept or dropped, the layout a
block-sparse (BSR) kernel runs with its vector lanes full.

``sparse`` works on every conv and linear layer, depthwise and grouped included;
``block-sparse`` on the layers that are one matrix product (Linear, 1x1 convs with one group,
stride 1 and no padding), where a BSR kernel can run it (``autohybrid.deploy``).
"""

from __future__ import annotations

import math
import re

import torch

from autohybrid.exceptions import MethodError
from autohybrid.fit import FitProblem, masked_lstsq, output_error, saliency
from autohybrid.inventory import LayerInfo
from autohybrid.layers import sparse_module
from autohybrid.methods.base import MAX_SPARSITY, Method, register, rel_error
from autohybrid.spec import LayerSpec

SALIENCY_KINDS = ("obs", "wanda")  # what saliency "best" tries


BLOCKS = ((8, 8), (4, 4))  # block shapes block-sparse offers, preferred first


def parse_block(pattern: str) -> tuple[int, int] | None:
    """``'8x8'`` -> (8, 8) (a block pattern: rows x columns of the (out, in) matrix);
    anything else -> None."""
    m = re.fullmatch(r"(\d+)x(\d+)", pattern)
    if m is None:
        return None
    r, c = int(m[1]), int(m[2])
    if r < 1 or c < 1:
        raise MethodError(f"block pattern {pattern!r} needs blocks of at least 1x1")
    return r, c


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``'2:4'`` -> (2, 4); ``'unstructured'`` and block patterns (``'8x8'``) -> None."""
    if pattern == "unstructured" or parse_block(pattern) is not None:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise MethodError(
            f"unknown sparsity pattern {pattern!r}; use 'unstructured', N:M such as '2:4', "
            "or blocks such as '8x8' (method block-sparse)"
        ) from None
    if not 0 < n < m:
        raise MethodError(f"sparsity pattern {pattern!r} needs 0 < N < M")
    return n, m


def keep_count(layer: LayerInfo, sparsity: float, pattern: str = "unstructured") -> int:
    """Nonzeros kept out of the weight's entries at ``sparsity`` (for blocks: whole blocks,
    at least one, never more than ``1 - sparsity`` of them)."""
    blk = parse_block(pattern)
    if blk is not None:
        size = blk[0] * blk[1]
        blocks = layer.weight_numel // size
        return max(1, math.floor(blocks * (1.0 - sparsity) + 1e-9)) * size
    nm = parse_pattern(pattern)
    if nm is not None:
        return layer.weight_numel // nm[1] * nm[0]
    return int(round(layer.weight_numel * (1.0 - sparsity)))


def index_bytes(numel: int, nnz: int) -> int:
    """Bytes to store which entries are nonzero: a bitmask or int32 indices, the smaller."""
    return min(math.ceil(numel / 8), 4 * nnz)


def check_sparsity(layer: LayerInfo, sparsity: float, pattern: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise MethodError(f"sparsity {sparsity} is outside [0, 1); use e.g. 0.5 for half zeros")
    blk = parse_block(pattern)
    if blk is not None:
        r, c = blk
        row = layer.weight_numel // layer.out_chs
        if layer.out_chs % r or row % c:
            raise MethodError(
                f"block pattern {pattern} needs {r} | out ({layer.out_chs}) and {c} | the row "
                f"length ({row}); use a block that divides both, e.g. 4x4"
            )
        return
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        row = layer.weight_numel // layer.out_chs
        if row % m:
            raise MethodError(
                f"pattern {pattern} needs a row length divisible by {m}, this layer has {row}"
            )
        if abs(sparsity - (1 - n / m)) > 1e-6:
            raise MethodError(f"pattern {pattern} means sparsity {1 - n / m:g}, got {sparsity:g}")


def magnitude_topk(w: torch.Tensor, keep: int, pattern: str = "unstructured") -> torch.Tensor:
    """Flat indices (sorted) of the ``keep`` largest-magnitude entries, of the N:M winners,
    or of the entries of the ``keep / (r c)`` blocks of largest summed magnitude."""
    blk = parse_block(pattern)
    if blk is not None:
        return _block_topk(w, keep, blk)
    nm = parse_pattern(pattern)
    a = w.detach().abs().reshape(-1)
    if nm is None:
        if keep <= 0:
            return torch.zeros(0, dtype=torch.long)
        if keep >= a.numel():
            return torch.arange(a.numel())
        idx = torch.topk(a, keep, sorted=False).indices
        return idx.sort().values
    n, m = nm
    groups = a.view(-1, m)
    local = torch.topk(groups, n, dim=1).indices
    idx = (torch.arange(groups.shape[0]).unsqueeze(1) * m + local).reshape(-1)
    return idx.sort().values


def _block_topk(w: torch.Tensor, keep: int, blk: tuple[int, int]) -> torch.Tensor:
    r, c = blk
    a = w.detach().abs().reshape(w.shape[0], -1)
    out, k = a.shape
    sums = a.view(out // r, r, k // c, c).sum(dim=(1, 3)).reshape(-1)
    n = min(keep // (r * c), sums.numel())
    chosen = torch.zeros(sums.numel(), dtype=torch.bool)
    chosen[torch.topk(sums, n, sorted=False).indices] = True
    mask = chosen.view(out // r, 1, k // c, 1).expand(out // r, r, k // c, c).reshape(-1)
    return mask.nonzero().squeeze(1)


def runs_as_matmul(layer: LayerInfo) -> bool:
    """Whether ``layer`` is one (out, in) matrix times its inputs: a Linear, or a 1x1 conv
    with one group, stride 1 and no padding (what CSR / BSR kernels run)."""
    if not layer.is_conv:
        return True
    return (layer.kernel_size == (1, 1) and layer.groups == 1 and layer.stride == (1, 1)
            and layer.padding == (0, 0))


def sparse_part(
    w: torch.Tensor, layer: LayerInfo, sparsity: float, pattern: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the sparse approximation of ``w``."""
    idx = magnitude_topk(w, keep_count(layer, sparsity, pattern), pattern)
    return idx, w.reshape(-1)[idx]


def fit_sparse(
    problem: FitProblem,
    target: torch.Tensor,
    layer: LayerInfo,
    sparsity: float,
    pattern: str,
    mask_from: torch.Tensor | None = None,
    kind: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse part fitted to the outputs of the (out, k) matrix ``target`` in the
    problem's metric: the mask by activation-aware saliency (``kind``, default
    ``problem.saliency``; exactly the allocated count, or exactly N of every M), the kept values
    by exact damped least squares per row (``autohybrid.fit.masked_lstsq``). ``mask_from``
    picks the mask by magnitude of that matrix instead. Returns (indices, values, the (out, k)
    sparse matrix)."""
    kind = kind or problem.saliency
    if mask_from is None and kind == "best":
        kind = SALIENCY_KINDS[0]
    score = saliency(problem, target, kind) if mask_from is None else mask_from.abs()
    idx = magnitude_topk(score, keep_count(layer, sparsity, pattern), pattern)
    mask = torch.zeros(target.numel(), dtype=torch.bool)
    mask[idx] = True
    values = masked_lstsq(target, problem.metric, mask.view(target.shape))
    return idx, values.reshape(-1)[idx], values


def scatter(shape, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.new_zeros(math.prod(shape)).scatter(0, idx, values).view(shape)


@register
class Sparse(Method):
    name = "sparse"
    color = "#1f77b4"

    def applies_to(self, layer):
        return True

    def spec_at(self, layer, keep, share=0.5, **_):
        return LayerSpec("sparse", sparsity=min(max(1.0 - keep, 0.0), MAX_SPARSITY))

    def grid(self, layer, space):
        out = [LayerSpec("sparse", sparsity=s) for s in space.sparsities]
        for pat in space.nm_patterns:
            n, m = (int(v) for v in pat.split(":"))
            out.append(LayerSpec("sparse", sparsity=1 - n / m, pattern=pat))
        return out

    def label(self, spec):
        pattern = "" if spec.pattern == "unstructured" else f" {spec.pattern}"
        return f"sparse {spec.sparsity:.2f}{pattern}"

    def check(self, layer, spec):
        super().check(layer, spec)
        if parse_block(spec.pattern) is not None:
            raise MethodError(f"block pattern {spec.pattern} belongs to method block-sparse; "
                              "write method: block-sparse")
        check_sparsity(layer, spec.sparsity, spec.pattern)

    def params(self, layer, spec):
        return keep_count(layer, spec.sparsity, spec.pattern) + (
            layer.out_chs if layer.bias else 0
        )

    def macs(self, layer, spec):
        return keep_count(layer, spec.sparsity, spec.pattern) * layer.positions

    def storage_bytes(self, layer, spec):
        nnz = keep_count(layer, spec.sparsity, spec.pattern)
        return 4 * self.params(layer, spec) + index_bytes(layer.weight_numel, nnz)

    def skeleton(self, layer, spec):
        return sparse_module(layer, keep_count(layer, spec.sparsity, spec.pattern), layer.bias)

    def fit(self, problem, bias, layer, spec, cache=None):
        """The saliency mask (``problem.saliency``; ``best``: OBS and Wanda both) and the
        weight fit's magnitude mask, each with its values refit by least squares; the lowest
        output error wins, so the data fit never loses to the weight fit's mask."""
        t = problem.matrix()
        kinds = SALIENCY_KINDS if problem.saliency == "best" else (problem.saliency,)
        best = None
        for kind in dict.fromkeys((*kinds, "magnitude")):
            fitted = fit_sparse(problem, t, layer, spec.sparsity, spec.pattern, kind=kind)
            err = output_error(t - fitted[2], problem.metric)
            if best is None or err < best[0]:
                best = (err, fitted)
        idx, values, approx = best[1]
        module = sparse_module(layer, idx.numel(), bias is not None)
        module.load_sparse(idx, values.to(module.values.dtype))
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module, approx.reshape(layer.weight_shape)

    def compress(self, weight, bias, layer, spec, cache=None):
        idx, values = sparse_part(weight, layer, spec.sparsity, spec.pattern)
        module = sparse_module(layer, idx.numel(), bias is not None)
        module.load_sparse(idx, values)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module, rel_error(weight, scatter(weight.shape, idx, values))


@register
class BlockSparse(Sparse):
    """Whole blocks (8x8, else 4x4, the first that tiles the matrix) kept by the summed
    saliency of their entries; the kept values fitted like ``sparse`` (least squares per row
    for the fixed mask). Worth it only where a BSR kernel beats the dense one, so the latency
    metric adds it to the pointwise and linear layers of a search space
    (``SearchSpace.for_latency``); the table measures whether it pays, layer by layer."""

    name = "block-sparse"
    color = "#17becf"

    def block_for(self, layer) -> tuple[int, int] | None:
        row = layer.weight_numel // layer.out_chs
        return next((b for b in BLOCKS if layer.out_chs % b[0] == 0 and row % b[1] == 0),
                    None)

    def applies_to(self, layer):
        return runs_as_matmul(layer) and self.block_for(layer) is not None

    def _pattern(self, layer) -> str:
        r, c = self.block_for(layer)
        return f"{r}x{c}"

    def spec_at(self, layer, keep, share=0.5, **_):
        if not self.applies_to(layer):
            return None
        return LayerSpec(self.name, sparsity=min(max(1.0 - keep, 0.0), MAX_SPARSITY),
                         pattern=self._pattern(layer))

    def grid(self, layer, space):
        if not self.applies_to(layer):
            return []
        return [LayerSpec(self.name, sparsity=s, pattern=self._pattern(layer))
                for s in space.sparsities]

    def label(self, spec):
        return f"block-sparse {spec.sparsity:.2f} {spec.pattern}"

    def check(self, layer, spec):
        Method.check(self, layer, spec)
        if parse_block(spec.pattern) is None:
            raise MethodError(f"block-sparse needs a block pattern such as '8x8', got "
                              f"{spec.pattern!r}")
        check_sparsity(layer, spec.sparsity, spec.pattern)

    def storage_bytes(self, layer, spec):
        r, c = parse_block(spec.pattern)
        kept = keep_count(layer, spec.sparsity, spec.pattern) // (r * c)
        return 4 * self.params(layer, spec) + index_bytes(layer.weight_numel // (r * c), kept)
