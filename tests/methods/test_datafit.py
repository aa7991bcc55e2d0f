"""Data-fitted layers: every compressed layer fitted to its outputs on calibration data.

The contracts, stated with numbers on TinyNet (one layer of every kind) and small hand-made
problems whose inputs are correlated (a low-rank signal plus noise, many more calibration rows
than columns):

1. full rank / zero sparsity with ``fit: data`` reproduces the dense layer;
2. for every registered method and every layer it applies to, the data fit's output error on
   the calibration inputs is at most the weight fit's;
3. the kept sparse values, the refit left factor, the last factor of every factorization and
   the whitened truncation are least-squares optimal in the damped metric;
4. masks keep exactly the allocated count / N of every M; a depthwise conv is fitted channel by
   channel, each channel's kept values the hand-made single-channel least squares;
5. the fit is deterministic in the calibration images and depends on them;
6. ``apply`` without calibration warns once and weight-fits; the sequential problem's target
   is the exact minimiser, and the sequential fit beats the independent one end to end;
7. dead input channels and fewer calibration rows than columns never give NaN;
8. ``fit`` round-trips through LayerSpec and the allocation file.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import autohybrid as ah
from autohybrid.cost import layer_cost
from autohybrid.fit import (
    DAMP,
    damped,
    masked_lstsq,
    output_error,
    problem_from_stats,
    refit_left,
    sequential_problem,
    whitened_lowrank,
)
from autohybrid.methods import HYBRID, METHODS, LowRankMethod, applicable_methods
from autohybrid.methods.base import build
from autohybrid.methods.sparse import keep_count
from autohybrid.stats import collect_stats
from tests.conftest import TINY_INPUT, TinyNet

N_CALIB = 256  # rows per layer: >= 256 * 18 for every layer but the head (256 rows, k = 36)


def correlated_images(n: int, seed: int) -> torch.Tensor:
    """A rank-4 signal with decaying strengths plus small noise: strongly correlated pixels."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(TINY_INPUT)
    basis = torch.randn(4, d, generator=g)
    coef = torch.randn(n, 4, generator=g) * torch.tensor([3.0, 2.0, 1.5, 1.0])
    return (coef @ basis + 0.3 * torch.randn(n, d, generator=g)).view(n, *TINY_INPUT)


def correlated_rows(n: int, k: int, seed: int, rank: int = 3) -> torch.Tensor:
    """(n, k) float64 rows: low rank plus a shared offset plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, k, generator=g, dtype=torch.float64
    )
    shared = torch.randn(1, k, generator=g, dtype=torch.float64)
    return 2 * low + 3 * shared + 0.1 * torch.randn(n, k, generator=g, dtype=torch.float64)


def make_tiny() -> TinyNet:
    torch.manual_seed(0)  # the ``tiny`` fixture's weights
    return TinyNet().eval()


def dense_parts(net, name):
    mod = net.get_submodule(name)
    bias = mod.bias.detach() if mod.bias is not None else None
    return mod, mod.weight.detach(), bias


@torch.no_grad()
def layer_inputs(net, names, images) -> dict[str, torch.Tensor]:
    """The input every layer in ``names`` receives for ``images``."""
    got: dict[str, torch.Tensor] = {}
    hooks = [
        net.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: got.__setitem__(n, args[0].detach().clone())
        )
        for n in names
    ]
    try:
        net(images)
    finally:
        for h in hooks:
            h.remove()
    return got


class Calib:
    """TinyNet, every layer in the inventory, its stats and captured inputs on one set."""

    def __init__(self, seed: int = 1):
        self.net = make_tiny()
        self.inv = ah.inventory(self.net, TINY_INPUT, exclude=[])
        self.names = [layer.name for layer in self.inv]
        self.images = correlated_images(N_CALIB, seed)
        self.stats = collect_stats(self.net, self.inv, self.names, self.images, progress=False)
        self.inputs = layer_inputs(self.net, self.names, self.images)

    def problem(self, name, **kw):
        return problem_from_stats(self.net.get_submodule(name).weight, self.stats.h[name], **kw)

    @torch.no_grad()
    def output_energy(self, name) -> float:
        """||X W^T||^2: the dense layer's outputs on the calibration inputs, bias removed."""
        dense = self.net.get_submodule(name)
        y = copy.deepcopy(dense).double()(self.inputs[name].double())
        if dense.bias is not None:
            b = dense.bias.double()
            y = y - (b.view(-1, 1, 1) if isinstance(dense, torch.nn.Conv2d) else b)
        return float((y**2).sum())

    @torch.no_grad()
    def output_error(self, name, module) -> float:
        """sum ||module(x) - dense(x)||^2 over the calibration inputs of ``name``, float64."""
        x = self.inputs[name].double()
        dense = copy.deepcopy(self.net.get_submodule(name)).double()
        out = copy.deepcopy(module).double()(x)
        return float(((out - dense(x)) ** 2).sum())


@pytest.fixture(scope="module")
def calib() -> Calib:
    return Calib()


def lowrank_names(layer) -> list[str]:
    return [n for n, m in METHODS.items() if isinstance(m, LowRankMethod) and m.applies_to(layer)]


def row_len(layer) -> int:
    return layer.weight_numel // layer.out_chs


def compressing_specs(method: str, layer) -> list[ah.LayerSpec]:
    """Specs that really compress ``layer`` (weight fit; ``fit`` replaced by the callers)."""
    m = METHODS[method]
    if method == "sparse":
        specs = [ah.LayerSpec("sparse", sparsity=s) for s in (0.5, 0.9)]
        if row_len(layer) % 4 == 0:
            specs.append(ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4"))
        return specs
    if method == "block-sparse":
        pattern = m.spec_at(layer, 0.5).pattern
        return [ah.LayerSpec(method, sparsity=s, pattern=pattern) for s in (0.5, 0.8)]
    if method == HYBRID:
        return [
            ah.LayerSpec(HYBRID, factorization=f, rank=METHODS[f].rank_for_ratio(layer, 0.3),
                         sparsity=0.9, refine=1)
            for f in lowrank_names(layer)
        ]
    if isinstance(m, LowRankMethod):
        full = m.max_rank(layer)
        ranks = {m.rank_for_ratio(layer, r) for r in (0.25, 0.6)}
        return [ah.LayerSpec(method, rank=r) for r in sorted(ranks) if r != full]
    pytest.fail(f"no compressing spec known for the new method {method!r}: add one to "
                "compressing_specs in tests/methods/test_datafit.py")


def data(spec: ah.LayerSpec) -> ah.LayerSpec:
    return replace(spec, fit="data")


# -- 1. full rank / zero sparsity -----------------------------------------------------------


def full_specs(layer) -> list[ah.LayerSpec]:
    """Specs that represent the dense weight exactly (cp has no exact finite rank)."""
    specs = [ah.LayerSpec("sparse", sparsity=0.0)]
    for f in lowrank_names(layer):
        if f == "cp":
            continue
        full = METHODS[f].max_rank(layer)
        specs.append(ah.LayerSpec(f, rank=full))
        specs.append(ah.LayerSpec(HYBRID, factorization=f, rank=full, sparsity=0.9))
        specs.append(ah.LayerSpec(HYBRID, factorization=f, rank=(1,) * len(full), sparsity=0.0))
    return specs


def test_full_rank_zero_sparsity_data_fit_is_the_dense_layer(calib):
    checked = set()
    for layer in calib.inv:
        dense, w, b = dense_parts(calib.net, layer.name)
        problem = calib.problem(layer.name)
        x_cal = calib.inputs[layer.name]
        gen = torch.Generator().manual_seed(5)
        x_rand = torch.randn(3, *x_cal.shape[1:], generator=gen)
        for spec in full_specs(layer):
            METHODS[spec.method].check(layer, spec)
            module, err = build(w, b, layer, data(spec), problem)
            with torch.no_grad():
                for x in (x_cal, x_rand):
                    y = dense(x)
                    scale = float(y.abs().max())
                    torch.testing.assert_close(
                        module(x), y, atol=1e-4 * scale, rtol=1e-4,
                        msg=lambda m, spec=spec, n=layer.name: f"{n} {spec}: {m}",
                    )
            assert err < 1e-5, (layer.name, spec, err)
            checked.add((spec.method, spec.factorization, layer.kind))
    for method in ("sparse", "svd", "tucker2", "tt", HYBRID):
        assert any(c[0] == method for c in checked), method
    assert ("sparse", None, "depthwise") in checked and ("sparse", None, "grouped") in checked


# -- 2. the data fit never loses to the weight fit on the calibration data -----------------


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_data_fit_output_error_at_most_weight_fit(calib, method):
    layers = [la for la in calib.inv if method in applicable_methods(la)]
    if not layers:
        pytest.skip(f"method {method!r} applies to no layer of TinyNet")
    worse, rows = [], []
    for layer in layers:
        _, w, b = dense_parts(calib.net, layer.name)
        problem = calib.problem(layer.name)
        for spec in compressing_specs(method, layer):
            METHODS[method].check(layer, spec)
            by_weights, _ = build(w, b, layer, spec)
            by_data, _ = build(w, b, layer, data(spec), problem)
            e_w = calib.output_error(layer.name, by_weights)
            e_d = calib.output_error(layer.name, by_data)
            rows.append((layer.name, spec, e_w, e_d))
            if e_d > e_w * (1 + 1e-6):
                worse.append(f"{layer.name} ({layer.kind}) {spec}: data {e_d:.6g} > weights "
                             f"{e_w:.6g} (ratio {e_d / e_w:.4f})")
    assert rows
    assert not worse, "data fit worse than weight fit:\n" + "\n".join(worse)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_reported_data_fit_error_is_the_measured_output_error(calib, method):
    """``build``'s relative error for a data fit is ||X(W - Ŵ)^T|| / ||X W^T|| on the rows."""
    layers = [la for la in calib.inv if method in applicable_methods(la)]
    if not layers:
        pytest.skip(f"method {method!r} applies to no layer of TinyNet")
    for layer in layers:
        _, w, b = dense_parts(calib.net, layer.name)
        spec = compressing_specs(method, layer)[0]
        module, err = build(w, b, layer, data(spec), calib.problem(layer.name))
        energy = calib.output_energy(layer.name)
        measured = (calib.output_error(layer.name, module) / energy) ** 0.5
        assert 0 < err < 1
        assert err == pytest.approx(measured, rel=1e-3, abs=1e-6), (layer.name, spec)


def dense_op(layer, weight, bias, x):
    if layer.is_conv:
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_fit_returns_the_weight_its_module_represents(calib, method):
    """``Method.fit`` returns (module, the dense weight it represents): weight-shaped, and the
    module computes exactly that weight's layer (``build``'s reported error relies on it)."""
    layers = [la for la in calib.inv if method in applicable_methods(la)]
    if not layers:
        pytest.skip(f"method {method!r} applies to no layer of TinyNet")
    for layer in layers:
        _, w, b = dense_parts(calib.net, layer.name)
        spec = data(compressing_specs(method, layer)[0])
        module, approx = METHODS[method].fit(calib.problem(layer.name), b, layer, spec)
        assert tuple(approx.shape) == layer.weight_shape, (layer.name, spec, approx.shape)
        x = calib.inputs[layer.name][:4]
        with torch.no_grad():
            want = dense_op(layer, approx.reshape(layer.weight_shape).float(), b, x)
            torch.testing.assert_close(module(x), want, rtol=1e-4,
                                       atol=1e-4 * float(want.abs().max()))


# -- 3. least-squares optimality ------------------------------------------------------------


def metric_of(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Damped (G, k, k) second moment of (n, G*k) rows split into ``groups`` column blocks."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    return damped(torch.einsum("ngk,ngl->gkl", xg, xg))


def grouped_grad(w_hat, target, metric):
    """d/dŵ of sum_o (ŵ_o - t_o) H_g (ŵ_o - t_o)^T: 2 (ŵ - t) H_g, row by row."""
    g = metric.shape[0]
    e = (w_hat - target).reshape(g, w_hat.shape[0] // g, -1)
    return (2 * e @ metric).reshape(w_hat.shape)


def check_stationary_on_mask(w_hat, target, metric, mask, what):
    grad = grouped_grad(w_hat, target, metric)
    scale = grouped_grad(torch.zeros_like(target), target, metric).abs().max()
    assert (w_hat[~mask] == 0).all(), f"{what}: entries off the mask are not zero"
    rel = float(grad[mask].abs().max() / scale)
    assert rel < 1e-7, f"{what}: gradient on the kept entries is {rel:.3g} of the scale"
    base = output_error(w_hat - target, metric)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        delta = torch.randn(w_hat.shape, generator=gen, dtype=torch.float64) * mask
        delta *= 1e-3 * float(target.abs().max()) / float(delta.abs().max())
        assert output_error(w_hat + delta - target, metric) > base, what


@pytest.mark.parametrize("groups", [1, 3])
def test_masked_lstsq_kept_values_are_the_least_squares_optimum(groups):
    k, per = 10, 4
    x = correlated_rows(400, groups * k, seed=groups)
    metric = metric_of(x, groups)
    gen = torch.Generator().manual_seed(groups)
    target = torch.randn(groups * per, k, generator=gen, dtype=torch.float64)
    mask = torch.rand(target.shape, generator=gen) < 0.45
    mask[0] = False  # a row with nothing kept
    mask[1] = True  # a row with everything kept
    w_hat = masked_lstsq(target, metric, mask)
    check_stationary_on_mask(w_hat, target, metric, mask, f"masked_lstsq G={groups}")
    torch.testing.assert_close(w_hat[1], target[1], rtol=1e-9, atol=1e-9)
    # solving in small batches of rows gives the same values
    torch.testing.assert_close(masked_lstsq(target, metric, mask, chunk_entries=2 * k * k),
                               w_hat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["conv5", "grouped", "tok"])
def test_sparse_fit_kept_values_are_the_least_squares_optimum(calib, name):
    layer = calib.inv[name]
    problem = calib.problem(name)
    _, _, b = dense_parts(calib.net, name)
    spec = ah.LayerSpec("sparse", sparsity=0.6, fit="data")
    module, approx = METHODS["sparse"].fit(problem, b, layer, spec)
    target = problem.matrix()
    w_hat = approx.double().reshape(target.shape)
    mask = torch.zeros(target.numel(), dtype=torch.bool)
    mask[module.indices] = True
    mask = mask.view(target.shape)
    check_stationary_on_mask(w_hat, target, problem.metric, mask, f"sparse fit {name}")
    # the module holds exactly those values
    torch.testing.assert_close(module.weight().detach().double().reshape(target.shape), w_hat,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["pw", "tok"])
def test_block_sparse_fit_keeps_whole_blocks_at_the_least_squares_optimum(calib, name):
    """A block-sparse data fit keeps exactly the counted number of whole blocks, and its
    values are the least-squares optimum for that mask (as for ``sparse``)."""
    layer = calib.inv[name]
    problem = calib.problem(name)
    _, _, b = dense_parts(calib.net, name)
    spec = data(METHODS["block-sparse"].spec_at(layer, 0.3))
    r, c = (int(v) for v in spec.pattern.split("x"))
    module, approx = METHODS["block-sparse"].fit(problem, b, layer, spec)
    target = problem.matrix()
    mask = torch.zeros(target.numel(), dtype=torch.bool)
    mask[module.indices] = True
    mask = mask.view(target.shape)
    out, k = target.shape
    blocks = mask.view(out // r, r, k // c, c).sum(dim=(1, 3))
    assert set(blocks.unique().tolist()) <= {0, r * c}, "a block is partly kept"
    assert int((blocks > 0).sum()) * r * c == module.nnz == layer_cost(layer, spec).params - (
        layer.out_chs if layer.bias else 0)
    assert module.nnz <= 0.3 * layer.weight_numel
    check_stationary_on_mask(approx.double().reshape(target.shape), target, problem.metric,
                             mask, f"block-sparse fit {name}")


def test_refit_left_is_the_least_squares_left_factor():
    k, out, r = 12, 8, 3
    metric = metric_of(correlated_rows(300, k, seed=4))
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(out, k, generator=gen, dtype=torch.float64)
    right = torch.randn(r, k, generator=gen, dtype=torch.float64)
    left = refit_left(target, metric, right)
    grad = 2 * (left @ right - target) @ metric[0] @ right.T
    scale = (2 * target @ metric[0] @ right.T).abs().max()
    assert float(grad.abs().max() / scale) < 1e-8
    base = output_error(left @ right - target, metric)
    for _ in range(10):
        other = left + 1e-3 * torch.randn(left.shape, generator=gen, dtype=torch.float64)
        assert output_error(other @ right - target, metric) > base


def test_whitened_lowrank_is_the_optimal_rank_r_fit():
    k, out, r = 12, 9, 4
    metric = metric_of(correlated_rows(300, k, seed=6))
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(out, k, generator=gen, dtype=torch.float64)
    a, b = whitened_lowrank(target, metric, r)
    assert a.shape == (r, k) and b.shape == (out, r)
    err = output_error(target - b @ a, metric)
    s = torch.linalg.svdvals(target @ torch.linalg.cholesky(metric[0]))
    assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)
    # any other rank-r right factor, its left factor refit, does worse: random ones and the
    # weight's own top-r right singular vectors (the weight fit)
    rights = [torch.randn(r, k, generator=gen, dtype=torch.float64) for _ in range(20)]
    rights.append(torch.linalg.svd(target, full_matrices=False)[2][:r])
    for right in rights:
        other = refit_left(target, metric, right) @ right
        assert output_error(target - other, metric) >= err * (1 - 1e-9)
    # and the metric matters: the weight's own truncation is clearly worse in the data
    plain = refit_left(target, metric, rights[-1]) @ rights[-1]
    assert output_error(target - plain, metric) > 1.01 * err


def last_factor_gradient(lr, factors, target, metric, layer) -> tuple[float, float]:
    """(max |d err / d last factor|, the same at a zero last factor): the chain is linear in
    its last factor, so the Jacobian comes from reconstructing unit last factors."""
    last = factors[-1]
    t = target.reshape(target.shape[0], -1)
    resid = 2 * (lr.reconstruct(factors, layer).double().reshape(t.shape) - t) @ metric[0]
    start = 2 * (-t) @ metric[0]
    grad = torch.zeros(last.numel(), dtype=torch.float64)
    grad0 = torch.zeros(last.numel(), dtype=torch.float64)
    for j in range(last.numel()):
        unit = torch.zeros(last.numel(), dtype=last.dtype)
        unit[j] = 1
        basis = lr.reconstruct([*factors[:-1], unit.view(last.shape)], layer).double()
        basis = basis.reshape(t.shape)
        grad[j] = (resid * basis).sum()
        grad0[j] = (start * basis).sum()
    return float(grad.abs().max()), float(grad0.abs().max())


@pytest.mark.parametrize(
    "method", [n for n, m in METHODS.items() if isinstance(m, LowRankMethod)]
)
def test_fitted_last_factor_is_least_squares(calib, method):
    """Every factorization's data fit leaves the factor next to the output optimal for the
    others (default ``refit_last``, TT's own, svd / tucker2's exact solutions)."""
    lr = METHODS[method]
    layers = [la for la in calib.inv if lr.applies_to(la) and la.name != "conv5"]
    if not layers:
        pytest.skip(f"{method} applies to no small layer of TinyNet")
    layer = layers[-1]
    problem = calib.problem(layer.name)
    rank = lr.rank_for_ratio(layer, 0.4)
    factors = lr.fit_factors(problem.target, problem.metric, layer, rank)
    grad, scale = last_factor_gradient(lr, factors, problem.target, problem.metric, layer)
    assert grad / scale < 1e-7, (method, layer.name, rank, grad, scale)


# -- 4. masks, grouped and depthwise fits ---------------------------------------------------


def sparse_mask(module, shape) -> torch.Tensor:
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[module.indices] = True
    return mask.view(shape)


def sparse_branch(module):
    return module.sparse if hasattr(module, "sparse") else module


@pytest.mark.parametrize("saliency", ["obs", "wanda"])
def test_sparse_fit_keeps_exactly_the_allocated_count(calib, saliency):
    for layer in calib.inv:
        _, w, b = dense_parts(calib.net, layer.name)
        problem = calib.problem(layer.name, saliency=saliency)
        specs = [ah.LayerSpec("sparse", sparsity=s, fit="data") for s in (0.3, 0.75, 0.9)]
        lf = lowrank_names(layer)
        if lf:
            specs.append(ah.LayerSpec(HYBRID, factorization=lf[0],
                                      rank=METHODS[lf[0]].rank_for_ratio(layer, 0.3),
                                      sparsity=0.8, fit="data"))
        for spec in specs:
            module, _ = build(w, b, layer, spec, problem)
            sp = sparse_branch(module)
            want = keep_count(layer, spec.sparsity, spec.pattern)
            assert sp.nnz == want, (layer.name, spec)
            assert int(sparse_mask(sp, layer.weight_shape).sum()) == want, (
                f"{layer.name} {spec}: repeated indices"
            )


def test_n_m_pattern_keeps_n_of_every_m(calib):
    checked = 0
    for layer in calib.inv:
        if row_len(layer) % 4:
            continue
        _, w, b = dense_parts(calib.net, layer.name)
        problem = calib.problem(layer.name)
        specs = [ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4", fit="data")]
        for f in lowrank_names(layer):
            specs.append(ah.LayerSpec(HYBRID, factorization=f, sparsity=0.5, pattern="2:4",
                                      rank=METHODS[f].rank_for_ratio(layer, 0.2), fit="data"))
        for spec in specs:
            module, _ = build(w, b, layer, spec, problem)
            mask = sparse_mask(sparse_branch(module), layer.weight_shape).reshape(-1, 4)
            assert (mask.sum(1) == 2).all(), (layer.name, spec)
            checked += 1
    assert checked >= 5


def test_stats_are_the_moments_of_the_layer_outputs(calib):
    """Per layer, sum_o w_o H_g w_o^T is the measured output energy ||X W^T||^2 (padding,
    stride, dilation and groups applied as the layer does), with G = groups."""
    for layer in calib.inv:
        _, w, _ = dense_parts(calib.net, layer.name)
        h = calib.stats.h[layer.name]
        k = layer.weight_numel // layer.out_chs
        assert h.shape == (layer.groups, k, k) and h.dtype == torch.float64, layer.name
        energy = calib.output_energy(layer.name)
        via_h = output_error(w.double().reshape(w.shape[0], -1), h)
        assert via_h == pytest.approx(energy, rel=1e-5), layer.name
    assert calib.stats.h["dw"].shape[0] == 16 and calib.stats.h["grouped"].shape[0] == 4


def test_depthwise_fit_is_per_channel_least_squares(calib):
    layer = calib.inv["dw"]
    assert layer.kind == "depthwise"
    _, w, b = dense_parts(calib.net, "dw")
    problem = calib.problem("dw")
    assert problem.metric.shape == (16, 9, 9)
    module, _ = build(w, b, layer, ah.LayerSpec("sparse", sparsity=0.5, fit="data"), problem)
    fitted = module.weight().detach().double().reshape(16, 9)
    mask = sparse_mask(module, layer.weight_shape).reshape(16, 9)
    x = calib.inputs["dw"].double()
    target = w.double().reshape(16, 9)
    kept_counts = set()
    for c in range(16):
        patches = F.unfold(x[:, c : c + 1], 3, padding=1).transpose(1, 2).reshape(-1, 9)
        lam = DAMP * float((patches**2).sum(0).mean())
        m = mask[c]
        kept_counts.add(int(m.sum()))
        if not m.any():
            assert (fitted[c] == 0).all()
            continue
        # argmin ||P (w - v)||^2 + lam ||w - v||^2 over v supported on m, as one lstsq
        a = torch.cat([patches[:, m], lam**0.5 * torch.eye(int(m.sum()), dtype=torch.float64)])
        rhs = torch.cat([patches @ target[c], lam**0.5 * target[c, m]])
        v = torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0]
        torch.testing.assert_close(fitted[c, m], v, rtol=1e-5,
                                   atol=1e-5 * float(target[c].abs().max()),
                                   msg=lambda s, c=c: f"channel {c}: {s}")
        assert (fitted[c, ~m] == 0).all()
    assert len(kept_counts) > 1, "the mask is global over channels, not a fixed count per row"


# -- 5. determinism -------------------------------------------------------------------------


def mixed_allocation(inv, fit="data", **meta) -> ah.Allocation:
    layers = {
        "conv": ah.LayerSpec("tucker2", rank=(3, 4), fit=fit),
        "pw": ah.LayerSpec(HYBRID, factorization="svd", rank=(3,), sparsity=0.9, fit=fit),
        "dw": ah.LayerSpec("sparse", sparsity=0.5, fit=fit),
        "grouped": ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4", fit=fit),
        "conv5": ah.LayerSpec("cp", rank=(12,), fit=fit),
        "tok": ah.LayerSpec("tt", rank=(2, 4), fit=fit),
    }
    alloc = ah.Allocation.for_inventory(inv, layers)
    if meta:
        alloc.meta["fit"] = dict(meta)
    return alloc


def test_same_calibration_gives_bit_identical_weights(tiny):
    inv = ah.inventory(tiny, TINY_INPUT)
    alloc = mixed_allocation(inv)
    images = correlated_images(64, seed=11)
    a = ah.apply(tiny, alloc, calibration=images, progress=False).state_dict()
    b = ah.apply(tiny, alloc, calibration=images.clone(), progress=False).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other = correlated_images(64, seed=12)
    c = ah.apply(tiny, alloc, calibration=other, progress=False).state_dict()
    for name in alloc.layers:
        keys = [k for k in a if k.startswith(name + ".") and not k.endswith("bias")]
        assert keys and any(not torch.equal(a[k], c[k]) for k in keys), name


# -- 6. apply: fallback, sequential ---------------------------------------------------------


def test_apply_data_fit_without_calibration_warns_once_and_weight_fits(tiny):
    inv = ah.inventory(tiny, TINY_INPUT)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        by_weights = ah.apply(tiny, mixed_allocation(inv, fit="weights"), progress=False)
    assert not [w for w in seen if "calibration" in str(w.message)]
    with pytest.warns(UserWarning, match="no calibration images") as record:
        fallback = ah.apply(tiny, mixed_allocation(inv), progress=False)
    assert len([w for w in record if "calibration" in str(w.message)]) == 1
    a, b = by_weights.state_dict(), fallback.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def seq_case(groups: int = 1, k: int = 8, per: int = 3):
    x = correlated_rows(300, groups * k, seed=20 + groups)
    gen = torch.Generator().manual_seed(groups)
    # X̃: X through a lossy map (a compressed layer before) plus a little noise
    distort = torch.eye(groups * k, dtype=torch.float64) + 0.3 * torch.randn(
        groups * k, groups * k, generator=gen, dtype=torch.float64)
    x_t = x @ distort + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(groups * per, k, generator=gen, dtype=torch.float64)
    return x, x_t, w


def grouped_moments(a, b, groups):
    ag, bg = a.reshape(len(a), groups, -1), b.reshape(len(b), groups, -1)
    return torch.einsum("ngk,ngl->gkl", ag, bg)


def seq_objective(w_hat, w, x, x_t, groups, lam):
    """sum_g ||X_g w_g^T - X̃_g ŵ_g^T||^2 + λ_g ||ŵ_g - w_g||^2."""
    total = 0.0
    n = len(x)
    xg, xtg = x.reshape(n, groups, -1), x_t.reshape(n, groups, -1)
    wg, whg = w.reshape(groups, -1, w.shape[1]), w_hat.reshape(groups, -1, w.shape[1])
    for g in range(groups):
        total += float(((xg[:, g] @ wg[g].T - xtg[:, g] @ whg[g].T) ** 2).sum())
        total += float(lam[g] * ((whg[g] - wg[g]) ** 2).sum())
    return total


@pytest.mark.parametrize("groups", [1, 4])
def test_sequential_problem_with_unchanged_inputs_targets_the_weight(groups):
    x, _, w = seq_case(groups)
    h = grouped_moments(x, x, groups)
    problem = sequential_problem(w, h, h)
    torch.testing.assert_close(problem.target, w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(problem.metric, damped(h))


@pytest.mark.parametrize("groups", [1, 4])
def test_sequential_problem_target_minimises_the_sequential_objective(groups):
    x, x_t, w = seq_case(groups)
    h_t, cross = grouped_moments(x_t, x_t, groups), grouped_moments(x_t, x, groups)
    problem = sequential_problem(w, h_t, cross)
    lam = DAMP * h_t.diagonal(dim1=-2, dim2=-1).mean(-1)
    t = problem.target
    assert not torch.allclose(t, w, rtol=1e-3, atol=1e-3)  # the inputs did change
    # gradient of the objective at the target, group by group
    per = w.shape[0] // groups
    for g in range(groups):
        rows = slice(g * per, (g + 1) * per)
        xg, xtg = x.reshape(len(x), groups, -1)[:, g], x_t.reshape(len(x), groups, -1)[:, g]
        grad = 2 * (xtg @ t[rows].T - xg @ w[rows].T).T @ xtg + 2 * lam[g] * (t[rows] - w[rows])
        scale = (2 * (xg @ w[rows].T).T @ xtg).abs().max()
        assert float(grad.abs().max() / scale) < 1e-9, g
    # and the objective is the target's error in the metric plus a constant
    gen = torch.Generator().manual_seed(9)
    base = seq_objective(t, w, x, x_t, groups, lam)
    for _ in range(5):
        other = t + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
        gap = seq_objective(other, w, x, x_t, groups, lam) - base
        assert gap > 0
        assert gap == pytest.approx(output_error(other - t, problem.metric), rel=1e-6)


@torch.no_grad()
def test_sequential_fit_beats_independent_fit_on_the_final_outputs():
    """The head is fitted last, on inputs changed by the compressed conv before it; the head's
    outputs are the model's, so the sequential fit's (exact rank-r in the right metric) must
    give the lower final error on the calibration data."""
    net = make_tiny()
    inv = ah.inventory(net, TINY_INPUT, exclude=[])
    images = correlated_images(N_CALIB, seed=13)
    layers = {"conv": ah.LayerSpec("tucker2", rank=(3, 3), fit="data"),
              "head": ah.LayerSpec("svd", rank=(2,), fit="data")}
    dense_out = net(images)
    errs = {}
    for sequential in (True, False):
        alloc = ah.Allocation.for_inventory(inv, layers)
        alloc.meta["fit"] = {"sequential": sequential}
        small = ah.apply(net, alloc, calibration=images, progress=False)
        errs[sequential] = float(((small(images) - dense_out) ** 2).sum())
    assert errs[True] < 0.98 * errs[False], errs


# -- 7. degenerate statistics ---------------------------------------------------------------


@torch.no_grad()
def dead_net() -> TinyNet:
    """TinyNet with dead channels at every layer's input (weights and biases zeroed)."""
    net = make_tiny()
    for name, rows in (("stem", 3), ("conv", 4), ("pw", 5), ("grouped", 4), ("conv5", 8),
                       ("tok", 10)):
        mod = net.get_submodule(name)
        mod.weight[:rows] = 0
        if mod.bias is not None:
            mod.bias[:rows] = 0
    net.dw.bias[:5] = 0  # channels 0-4 get no input (pw rows zero): the whole group is dead
    return net


def test_dead_channels_and_few_rows_give_finite_fits():
    net = dead_net()
    inv = ah.inventory(net, TINY_INPUT, exclude=[])
    names = [la.name for la in inv]
    images = correlated_images(1, seed=14)
    images[:, 0] = 0  # a dead input channel of the stem
    with pytest.warns(UserWarning, match="calibration rows"):
        stats = collect_stats(net, inv, names, images, progress=False)
    assert stats.rows["tok"] < stats.h["tok"].shape[-1]
    assert float(stats.h["dw"][0].abs().max()) == 0.0  # an all-zero group
    bad = []
    for layer in inv:
        _, w, b = dense_parts(net, layer.name)
        problem = problem_from_stats(w, stats.h[layer.name])
        for method in applicable_methods(layer):
            if method == "dense":
                continue
            for spec in compressing_specs(method, layer):
                module, err = build(w, b, layer, data(spec), problem)
                finite = all(torch.isfinite(p).all() for p in module.state_dict().values()
                             if p.is_floating_point())
                if not finite or not math.isfinite(err):
                    bad.append(f"{layer.name} {spec}: finite weights {finite}, error {err}")
    assert not bad, "\n".join(bad)
    # a channel with no input at all keeps its dense values where kept (damping pulls towards
    # the dense weight, not towards zero)
    _, w, b = dense_parts(net, "dw")
    module, _ = build(w, b, inv["dw"], ah.LayerSpec("sparse", sparsity=0.1, fit="data"),
                      problem_from_stats(w, stats.h["dw"]))
    fitted = module.weight().detach().reshape(16, 9)
    kept = sparse_mask(module, inv["dw"].weight_shape).reshape(16, 9)[:5]
    assert kept.sum() >= 20
    torch.testing.assert_close(fitted[:5][kept], w.reshape(16, 9)[:5][kept])
    # and the whole sequential apply stays finite
    methods = {"stem": "tucker2", "conv": "cp", "pw": HYBRID, "dw": "sparse",
               "grouped": "sparse", "conv5": HYBRID, "tok": "tt", "head": "svd"}
    alloc = ah.Allocation.for_inventory(inv, {
        n: data(compressing_specs(m, inv[n])[-1]) for n, m in methods.items()
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = ah.apply(net, alloc, calibration=images, progress=False)
    for key, value in small.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    assert torch.isfinite(small(correlated_images(4, seed=15))).all()


# -- 8. the spec and the file ---------------------------------------------------------------


def test_layerspec_fit_round_trips_and_rejects_bad_values():
    d = {"method": "sparse", "sparsity": 0.5, "fit": "data"}
    spec = ah.LayerSpec.from_dict(d)
    assert spec.fit == "data" and spec.method == "sparse" and spec.sparsity == 0.5
    assert spec.to_dict() == {**d, "pattern": "unstructured"}
    assert ah.LayerSpec.from_dict(spec.to_dict()) == spec
    assert ah.LayerSpec.from_dict({"method": "sparse", "sparsity": 0.5}).fit == "weights"
    assert "fit" not in ah.LayerSpec("svd", rank=(2,)).to_dict()
    for bad in ("Data", "activations", 1, None):
        with pytest.raises(ValueError) as e:
            ah.LayerSpec.from_dict({**d, "fit": bad})
        assert "weights" in str(e.value) and "data" in str(e.value), bad


def test_allocation_file_keeps_fit_and_meta_fit(tmp_path, tiny):
    inv = ah.inventory(tiny, TINY_INPUT)
    alloc = mixed_allocation(inv, damp=0.05, saliency="wanda", sequential=False)
    path = alloc.save(tmp_path / "alloc.yaml")
    back = ah.Allocation.load(path, inv)
    assert back.layers == alloc.layers
    assert all(s.fit == "data" for s in back.layers.values())
    assert back.meta == alloc.meta and back.meta["fit"] == {
        "damp": 0.05, "saliency": "wanda", "sequential": False}
    assert back.to_dict() == alloc.to_dict()
    from autohybrid.apply import fit_settings

    assert fit_settings(back) == {"damp": 0.05, "saliency": "wanda", "sequential": False}


@pytest.mark.parametrize("method", [m for m, x in METHODS.items() if x.lowrank] + [HYBRID])
def test_data_fitted_factors_share_one_scale(calib, method):
    """A data fit's factors come out with one Frobenius norm (``balance``), the product
    unchanged: a least-squares fit leaves the scale anywhere, and a fine-tune's gradient
    steps on a core of norm 200 beside unit-norm bases diverge."""
    from autohybrid.methods.base import balance

    layers = [la for la in calib.inv if method in applicable_methods(la)]
    for layer in layers:
        _, w, b = dense_parts(calib.net, layer.name)
        spec = data(compressing_specs(method, layer)[0])
        module, approx = METHODS[method].fit(calib.problem(layer.name), b, layer, spec)
        chain = module.lowrank if method == HYBRID else module
        norms = [float(p.norm()) for n, p in chain.named_parameters() if not n.endswith("bias")]
        assert max(norms) <= min(norms) * (1 + 1e-4), (layer.name, spec, norms)
    fs = [torch.randn(3, 4) * 100, torch.randn(4, 5) * 0.01]
    torch.testing.assert_close(balance(fs)[0] @ balance(fs)[1], fs[0] @ fs[1])
