"""One contract suite, parametrized over the method registry and every layer kind."""

from __future__ import annotations

import pytest
import torch

import autohybrid as ah
from autohybrid.exceptions import MethodError
from autohybrid.methods import HYBRID, METHODS, LowRankMethod, Method, register, unregister
from autohybrid.methods.sparse import keep_count
from autohybrid.search_space import SearchSpace
from autohybrid.testing import TINY_INPUT, TinyNet, check_method

torch.manual_seed(0)
MODEL = TinyNet().eval()
INV = ah.inventory(MODEL, TINY_INPUT, exclude=[])
LAYERS = {layer.name: layer for layer in INV}


def layer_input(layer):
    if layer.is_conv:
        return (layer.in_chs, *layer.in_hw)
    return (layer.positions, layer.in_chs)


def full_spec(method, layer):
    """Full rank and zero sparsity: must reproduce the dense layer (None if undefined)."""
    m = METHODS[method]
    if method == "cp":
        return None  # CP has no exact finite rank in general; covered through L+S below
    if method == HYBRID:
        f = [n for n, x in METHODS.items() if isinstance(x, LowRankMethod) and x.applies_to(layer)]
        return ah.LayerSpec(
            HYBRID, factorization=f[0], rank=(1,) * len(METHODS[f[0]].max_rank(layer))
        )
    if isinstance(m, LowRankMethod):
        return ah.LayerSpec(method, rank=m.max_rank(layer))
    if method == "block-sparse":
        return ah.LayerSpec(method, sparsity=0.0, pattern=m.spec_at(layer, 1.0).pattern)
    return ah.LayerSpec(method)


def small_specs(method, layer):
    m = METHODS[method]
    if method == "dense":
        return [ah.LayerSpec()]
    if method == "sparse":
        specs = [ah.LayerSpec("sparse", sparsity=0.7)]
        if (layer.weight_numel // layer.out_chs) % 4 == 0:
            specs.append(ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4"))
        return specs
    if method == "block-sparse":
        return [ah.LayerSpec(method, sparsity=0.7, pattern=m.spec_at(layer, 0.3).pattern)]
    if method == HYBRID:
        out = []
        for f, lr in METHODS.items():
            if isinstance(lr, LowRankMethod) and lr.applies_to(layer):
                out.append(
                    ah.LayerSpec(
                        HYBRID,
                        factorization=f,
                        rank=lr.rank_for_ratio(layer, 0.3),
                        sparsity=0.9,
                        refine=1,
                    )
                )
        return out
    return [ah.LayerSpec(method, rank=m.rank_for_ratio(layer, 0.4))]


CASES = [
    (method, name)
    for name, layer in LAYERS.items()
    for method in METHODS
    if METHODS[method].applies_to(layer)
]


def test_every_kind_is_covered():
    kinds = {(m, LAYERS[n].kind) for m, n in CASES}
    for method in METHODS:
        assert any(m == method for m, _ in kinds), method
    assert ("sparse", "depthwise") in kinds and ("sparse", "grouped") in kinds
    assert ("tt", "linear") in kinds


def compressed(layer, spec):
    dense = MODEL.get_submodule(layer.name)
    bias = dense.bias.detach() if dense.bias is not None else None
    module, err = METHODS[spec.method].compress(dense.weight.detach(), bias, layer, spec)
    return dense, module.eval(), err


@pytest.mark.parametrize("method,name", CASES)
def test_full_rank_zero_sparsity_is_exact(method, name):
    layer = LAYERS[name]
    spec = full_spec(method, layer)
    if spec is None:
        pytest.skip("cp has no exact rank; exactness is checked through lowrank+sparse")
    dense, module, err = compressed(layer, spec)
    x = torch.randn(3, *layer_input(layer))
    assert err < 1e-5
    torch.testing.assert_close(module(x), dense(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,name", CASES)
def test_counted_cost_equals_built_module(method, name):
    layer = LAYERS[name]
    for spec in small_specs(method, layer):
        METHODS[method].check(layer, spec)
        _, module, err = compressed(layer, spec)
        counted = ah.layer_cost(layer, spec)
        measured = ah.cost(module, layer_input(layer))
        assert counted.params == measured.params, spec
        assert counted.macs == measured.macs, spec
        assert 0.0 <= err <= 1.0 + 1e-6
        if spec.method in ("sparse", HYBRID):
            nnz = keep_count(layer, spec.sparsity, spec.pattern)
            assert sum(m.nnz for m in module.modules() if hasattr(m, "nnz")) == nnz


@pytest.mark.parametrize("method,name", CASES)
def test_skeleton_matches_compressed_structure(method, name):
    layer = LAYERS[name]
    for spec in small_specs(method, layer):
        _, module, _ = compressed(layer, spec)
        skel = METHODS[method].skeleton(layer, spec)
        a = {k: v.shape for k, v in module.state_dict().items()}
        b = {k: v.shape for k, v in skel.state_dict().items()}
        assert a == b
        skel.load_state_dict(module.state_dict())
        x = torch.randn(2, *layer_input(layer))
        torch.testing.assert_close(skel.eval()(x), module(x))


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if isinstance(m, LowRankMethod)])
def test_error_falls_as_rank_rises(method):
    lr = METHODS[method]
    layer = next(la for la in INV if lr.applies_to(la))
    w = MODEL.get_submodule(layer.name).weight.detach()
    errs = []
    for ratio in (0.2, 0.5, 1.0):
        spec = ah.LayerSpec(method, rank=lr.rank_for_ratio(layer, ratio))
        errs.append(lr.compress(w, None, layer, spec)[1])
    assert errs[0] >= errs[1] - 1e-6 >= errs[2] - 2e-6, errs


def test_hybrid_beats_its_lowrank_part():
    layer = LAYERS["conv5"]
    w = MODEL.conv5.weight.detach()
    lr = ah.LayerSpec("tucker2", rank=(4, 6))
    hy = ah.LayerSpec(HYBRID, factorization="tucker2", rank=(4, 6), sparsity=0.9)
    hy2 = ah.LayerSpec(HYBRID, factorization="tucker2", rank=(4, 6), sparsity=0.9, refine=3)
    e_lr = METHODS["tucker2"].compress(w, None, layer, lr)[1]
    e_hy = METHODS[HYBRID].compress(w, None, layer, hy)[1]
    e_hy2 = METHODS[HYBRID].compress(w, None, layer, hy2)[1]
    assert e_hy < e_lr and e_hy2 <= e_hy + 1e-6


def test_two_four_pattern_keeps_two_of_every_four():
    layer = LAYERS["tok"]
    spec = ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4")
    _, module, _ = compressed(layer, spec)
    w = module.weight().detach().reshape(-1, 4)
    assert ((w != 0).sum(1) <= 2).all() and module.nnz == layer.weight_numel // 2


@pytest.mark.parametrize(
    "name,spec,msg",
    [
        ("dw", ah.LayerSpec("svd", rank=(2,)), "does not apply to depthwise"),
        ("conv", ah.LayerSpec("tucker2", rank=(9, 4)), "exceeds the full rank [8, 12]"),
        ("conv", ah.LayerSpec("tucker2", rank=(4,)), "needs 2 rank value(s)"),
        ("conv", ah.LayerSpec("sparse", sparsity=1.0), "outside [0, 1)"),
        ("conv", ah.LayerSpec("sparse", sparsity=-0.1), "outside [0, 1)"),
        ("dw", ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4"), "divisible by 4"),
        ("tok", ah.LayerSpec("sparse", sparsity=0.3, pattern="2:4"), "means sparsity 0.5"),
        ("tok", ah.LayerSpec("sparse", sparsity=0.5, pattern="diagonal"), "unknown sparsity"),
        ("conv", ah.LayerSpec(HYBRID, factorization="svd", rank=(2,)), "use one of: cp, tucker2"),
        ("tok", ah.LayerSpec("tt", rank=(2, 2, 2, 2)), "split into 5 factors"),
    ],
)
def test_bad_specs_name_the_problem(name, spec, msg):
    with pytest.raises(MethodError, match=None) as e:
        METHODS[spec.method].check(LAYERS[name], spec)
    assert msg in str(e.value)


def test_unknown_method_lists_valid_names():
    with pytest.raises(MethodError, match="valid methods: block-sparse, cp, dense"):
        ah.get_method("pruning")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_passes_the_shipped_contract(method):
    assert check_method(method) > 0


class ToyRowDrop(Method):
    """A method a user might add: keep the strongest output rows of the weight, drop the
    rest (a dense layer with zeroed rows costs the same, so it stores only the kept rows)."""

    name = "toy-rowdrop"
    color = "#17becf"

    def applies_to(self, layer):
        return not layer.is_conv and layer.out_chs > 1

    def spec_at(self, layer, keep, share=0.5, **_):
        return ah.LayerSpec(self.name, rank=(max(1, int(keep * layer.out_chs)),))

    def grid(self, layer, space):
        return [self.spec_at(layer, k) for k in (0.5, 0.25)]

    def label(self, spec):
        return f"rows {spec.rank[0]}"

    def params(self, layer, spec):
        return spec.rank[0] * layer.in_chs + (spec.rank[0] if layer.bias else 0)

    def macs(self, layer, spec):
        return spec.rank[0] * layer.in_chs * layer.positions

    def skeleton(self, layer, spec):
        keep = torch.zeros(layer.out_chs, dtype=torch.long)[: spec.rank[0]]
        return _Rows(torch.nn.Linear(layer.in_chs, spec.rank[0], bias=layer.bias), keep,
                     layer.out_chs)

    def compress(self, weight, bias, layer, spec, cache=None):
        keep = weight.norm(dim=1).argsort(descending=True)[: spec.rank[0]].sort().values
        lin = torch.nn.Linear(layer.in_chs, spec.rank[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight[keep])
            if bias is not None:
                lin.bias.copy_(bias[keep])
        approx = torch.zeros_like(weight)
        approx[keep] = weight[keep]
        return _Rows(lin, keep, layer.out_chs), ah.methods.rel_error(weight, approx)


class _Rows(torch.nn.Module):
    def __init__(self, lin, keep, out):
        super().__init__()
        self.lin, self.out = lin, out
        self.register_buffer("keep", keep)

    def forward(self, x):
        y = x.new_zeros(*x.shape[:-1], self.out)
        return y.index_copy(-1, self.keep, self.lin(x))


@pytest.fixture
def toy():
    register(ToyRowDrop)
    yield ToyRowDrop.name
    unregister(ToyRowDrop.name)


def test_a_new_method_is_one_registered_class(toy):
    """One class and ``@register``: the contract suite runs on it, a search space lists
    it, the allocation file and apply take it."""
    assert check_method(toy) > 0
    space = SearchSpace(name="toy", methods={"linear": [toy]})
    layer = LAYERS["tok"]
    assert space.candidates(layer) == [ah.LayerSpec(toy, rank=(18,)), ah.LayerSpec(toy, rank=(9,))]
    alloc = ah.Allocation.for_inventory(INV, {"tok": ah.LayerSpec(toy, rank=(9,))})
    small = ah.apply(MODEL, ah.Allocation.from_dict(alloc.to_dict()), INV)
    assert ah.cost(small, TINY_INPUT).params == alloc.cost(INV).params


def test_a_taken_name_is_refused(toy):
    class Other(ToyRowDrop):
        pass

    with pytest.raises(MethodError, match="registered already"):
        register(Other)
    with pytest.raises(MethodError, match="registered already"):
        register(type("Sparse2", (ToyRowDrop,), {"name": "sparse"}))
