"""``lowrank+sparse``: W ~ L + S (Hawkins et al. 2021), the two branches run in parallel.

L comes from any registered low-rank method at its rank(s); S holds the largest-magnitude
entries of the residual W - L. ``refine`` alternating steps re-fit L to W - S and S to W - L.
The bias lives once, in the low-rank chain.

The data fit (``fit``) alternates the same steps in the layer's output metric: L fitted to
the outputs of W - S by the factorization's own data fit, S masked by saliency on W - L with
its values refit by least squares against L. The weight fit's L with its S values refit the
same way is the other candidate, so the data fit is never worse than the weight fit on the
calibration data.
"""

from __future__ import annotations

from autohybrid.exceptions import MethodError
from autohybrid.fit import output_error
from autohybrid.layers import LowRankSparse, sparse_module
from autohybrid.methods.base import (
    MAX_SPARSITY,
    METHODS,
    LowRankMethod,
    Method,
    balance,
    check_rank,
    load_factors,
    register,
    rel_error,
)
from autohybrid.methods.sparse import (
    check_sparsity,
    fit_sparse,
    index_bytes,
    keep_count,
    scatter,
    sparse_part,
)
from autohybrid.spec import LayerSpec


def lowrank_methods(layer) -> list[str]:
    return [n for n, m in METHODS.items() if isinstance(m, LowRankMethod) and m.applies_to(layer)]


@register
class LowRankPlusSparse(Method):
    name = "lowrank+sparse"
    color = "#d62728"

    def applies_to(self, layer):
        return bool(lowrank_methods(layer))

    def spec_at(self, layer, keep, share=0.5, *, factorization=None, rank_multiple=1,
                refine=0):
        """``1 - share`` of ``keep`` to the low-rank part (``factorization``), the rest of
        ``keep`` (at least ``share`` of it: ranks round down) to the sparse residual."""
        lr = METHODS.get(factorization) if factorization else None
        if lr is None or not lr.lowrank or not lr.applies_to(layer):
            return None
        numel = layer.weight_numel
        rank = lr.rank_for_params(layer, (1 - share) * keep * numel, rank_multiple)
        density = max(keep * numel - lr.lowrank_params(layer, rank), 0) / numel
        return LayerSpec(self.name, factorization=lr.name, rank=rank,
                         sparsity=min(1.0 - density, MAX_SPARSITY), refine=refine)

    def grid(self, layer, space):
        lr = METHODS.get(space.factorizations.get(layer.kind) or "")
        if lr is None or not lr.lowrank or not lr.applies_to(layer):
            return []
        return [LayerSpec(self.name, factorization=lr.name,
                          rank=lr.rank_at_ratio(layer, r, space.rank_multiple), sparsity=s,
                          refine=space.refine)
                for r in space.hybrid_rank_ratios for s in space.hybrid_sparsities]

    def label(self, spec):
        return (f"{spec.factorization}+S r{'x'.join(map(str, spec.rank))} "
                f"s{spec.sparsity:.2f}")

    def factorization(self, layer, spec) -> LowRankMethod:
        valid = lowrank_methods(layer)
        if spec.factorization not in valid:
            raise MethodError(
                f"lowrank+sparse factorization {spec.factorization!r} does not apply to this "
                f"{layer.kind} layer; use one of: {', '.join(valid)}"
            )
        return METHODS[spec.factorization]  # type: ignore[return-value]

    def check(self, layer, spec):
        super().check(layer, spec)
        lr = self.factorization(layer, spec)
        check_rank(lr.name, lr.full_rank_for(layer, spec.rank), spec.rank)
        check_sparsity(layer, spec.sparsity, spec.pattern)
        if spec.refine < 0:
            raise MethodError(f"refine must be >= 0, got {spec.refine}")

    def nnz(self, layer, spec) -> int:
        return keep_count(layer, spec.sparsity, spec.pattern)

    def params(self, layer, spec):
        lr = self.factorization(layer, spec)
        return lr.params(layer, spec) + self.nnz(layer, spec)

    def macs(self, layer, spec):
        lr = self.factorization(layer, spec)
        return lr.macs(layer, spec) + self.nnz(layer, spec) * layer.positions

    def storage_bytes(self, layer, spec):
        return 4 * self.params(layer, spec) + index_bytes(
            layer.weight_numel, self.nnz(layer, spec)
        )

    def skeleton(self, layer, spec):
        lr = self.factorization(layer, spec)
        return LowRankSparse(
            lr.chain(layer, spec.rank, layer.bias),
            sparse_module(layer, self.nnz(layer, spec), False),
        )

    def weight_parts(self, weight, layer, spec, cache=None):
        """The weight fit: (factors, L, sparse indices, sparse values)."""
        lr = self.factorization(layer, spec)
        factors = lr.decompose(weight, layer, spec.rank, cache)
        low = lr.reconstruct(factors, layer)
        idx, vals = sparse_part(weight - low, layer, spec.sparsity, spec.pattern)
        for _ in range(spec.refine):
            factors = lr.decompose(weight - scatter(weight.shape, idx, vals), layer, spec.rank)
            low = lr.reconstruct(factors, layer)
            idx, vals = sparse_part(weight - low, layer, spec.sparsity, spec.pattern)
        return factors, low, idx, vals

    def _module(self, layer, spec, factors, idx, vals, bias):
        lr = self.factorization(layer, spec)
        chain = lr.chain(layer, spec.rank, bias is not None)
        load_factors(chain, factors, bias)
        sparse = sparse_module(layer, idx.numel(), False)
        sparse.load_sparse(idx, vals.to(sparse.values.dtype))
        return LowRankSparse(chain, sparse)

    def compress(self, weight, bias, layer, spec, cache=None):
        factors, low, idx, vals = self.weight_parts(weight, layer, spec, cache)
        approx = low + scatter(weight.shape, idx, vals)
        return self._module(layer, spec, factors, idx, vals, bias), rel_error(weight, approx)

    def fit(self, problem, bias, layer, spec, cache=None):
        lr = self.factorization(layer, spec)
        t, metric = problem.matrix(), problem.metric
        shape = layer.weight_shape

        def lowrank(target, c=None):
            factors = balance(lr.fit_factors(target.reshape(shape), metric, layer, spec.rank,
                                             c))
            return factors, lr.reconstruct(factors, layer).reshape(t.shape)

        def sparse(resid, mask_from=None):
            return fit_sparse(problem, resid, layer, spec.sparsity, spec.pattern, mask_from)

        factors, low = lowrank(t, cache)
        idx, vals, s = sparse(t - low)
        for _ in range(max(spec.refine, 1)):
            factors, low = lowrank(t - s)
            idx, vals, s = sparse(t - low)
        candidates = [(factors, low, idx, vals, s)]
        # the weight fit's low-rank part and mask, its sparse values refit to the data
        wf, wlow, _, _ = self.weight_parts(problem.target, layer, spec)
        wf = balance(wf)
        wlow = wlow.reshape(t.shape)
        widx, wvals, ws = sparse(t - wlow, mask_from=t - wlow)
        candidates.append((wf, wlow, widx, wvals, ws))
        best = min(candidates, key=lambda c: output_error(t - c[1] - c[4], metric))
        factors, low, idx, vals, s = best
        module = self._module(layer, spec, factors, idx, vals, bias)
        return module, (low + s).reshape(shape)
