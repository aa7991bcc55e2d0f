"""``sparse``: magnitude pruning, unstructured or N:M, stored as values + indices.

Works on every conv and linear layer, depthwise and grouped included.
"""

from __future__ import annotations

import math

import torch

from autohybrid.exceptions import MethodError
from autohybrid.fit import FitProblem, masked_lstsq, output_error, saliency
from autohybrid.inventory import LayerInfo
from autohybrid.layers import sparse_module
from autohybrid.methods.base import MAX_SPARSITY, Method, register, rel_error
from autohybrid.spec import LayerSpec

SALIENCY_KINDS = ("obs", "wanda")  # what saliency "best" tries


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``'2:4'`` -> (2, 4); ``'unstructured'`` -> None."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise MethodError(
            f"unknown sparsity pattern {pattern!r}; use 'unstructured' or N:M such as '2:4'"
        ) from None
    if not 0 < n < m:
        raise MethodError(f"sparsity pattern {pattern!r} needs 0 < N < M")
    return n, m


def keep_count(layer: LayerInfo, sparsity: float, pattern: str = "unstructured") -> int:
    """Nonzeros kept out of the weight's entries at ``sparsity``."""
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
    """Flat indices (sorted) of the ``keep`` largest-magnitude entries, or of the N:M winners."""
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
