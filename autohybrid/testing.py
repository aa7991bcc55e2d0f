"""The method contract, shipped with the library (as ``optuna.testing`` ships its sampler
tests): a method registered with ``@register`` passes ``check_method(name)``, or the test
class ``MethodContract`` with ``method = "name"``.

What every method must do, on every layer kind it applies to (``TinyNet`` holds one of each):

- the cost it counts (params, MACs) is the cost of the module it builds, measured
  (``autohybrid.cost``, which uses ``torch.utils.flop_counter``);
- ``skeleton`` has the built module's structure and, loaded with its state, its outputs;
- the built module maps the dense layer's input to the dense layer's output shape;
- ``spec_at(layer, keep)`` keeps at most ``keep`` of the layer's weight parameters, up to
  rounding to a whole count, or its smallest spec (ranks 1) when that holds more (or is
  None), and what it returns and what ``grid`` returns passes ``check``;
- ``label`` is a few words, ``color`` a plot colour;
- a data fit (``fit``, where the method has one) does not lose to the weight fit on the
  calibration outputs it minimises;
- every deploy form (``autohybrid.deploy``: folded into one dense weight, sparse parts
  precomputed or CSR) gives the built module's outputs (1e-5 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from autohybrid.cost import cost, layer_cost
from autohybrid.inventory import Inventory, inventory
from autohybrid.methods import METHODS, get_method
from autohybrid.spec import LayerSpec

__all__ = ["TinyNet", "TINY_INPUT", "tiny_inventory", "check_method", "MethodContract",
           "layer_input"]

TINY_INPUT = (3, 12, 12)
KEEPS = (0.6, 0.3, 0.1)


class TinyNet(nn.Module):
    """One layer of every kind the tool handles, at a 12x12 input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
        self.pw = nn.Conv2d(12, 16, 1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False)
        self.conv5 = nn.Conv2d(16, 24, (5, 3), stride=(2, 1), padding=(2, 1))
        self.tok = nn.Linear(24, 36)
        self.head = nn.Linear(36, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = self.grouped(self.dw(self.pw(x)))
        x = self.conv5(x)  # (B, 24, 3, 6)
        x = self.tok(x.flatten(2).transpose(1, 2))  # (B, 18 tokens, 36)
        return self.head(x.mean(1))


def tiny_inventory(seed: int = 0) -> tuple[nn.Module, Inventory]:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    return model, inventory(model, TINY_INPUT, exclude=[])


def layer_input(layer) -> tuple[int, ...]:
    """One sample's input shape for ``layer`` (channels x H x W, or tokens x features)."""
    if layer.is_conv:
        return (layer.in_chs, *layer.in_hw)
    return (layer.positions, layer.in_chs)


class _Space:
    """The grid of a search space, as ``Method.grid`` reads it."""

    sparsities = (0.5, 0.8)
    nm_patterns = ("2:4",)
    rank_ratios = (0.25, 0.5)
    hybrid_rank_ratios = (0.25,)
    hybrid_sparsities = (0.9,)
    rank_multiple = 1
    refine = 1
    factorizations = {"conv": "tucker2", "pointwise": "svd", "linear": "svd"}


def _specs(method, layer) -> list[LayerSpec]:
    """The grid's valid specs (a space drops the others, as ``SearchSpace.candidates``
    does) and every ``spec_at`` spec, which must be valid."""
    from autohybrid.exceptions import MethodError

    specs = []
    for spec in method.grid(layer, _Space()):
        try:
            method.check(layer, spec)
        except MethodError:
            continue
        if spec not in specs:
            specs.append(spec)
    for keep in KEEPS:
        spec = method.spec_at(layer, keep, factorization=_Space.factorizations.get(layer.kind))
        if spec is None or spec.method == "dense" or spec in specs:
            continue
        try:
            method.check(layer, spec)
        except MethodError as e:
            raise AssertionError(f"{method.name}.spec_at({layer.name}, {keep}) = {spec} fails "
                                 f"check: {e}") from None
        specs.append(spec)
    return specs or [LayerSpec(method.name)]


def check_method(name: str, seed: int = 0) -> int:
    """Run the contract on every TinyNet layer ``name`` applies to; returns the number of
    (layer, spec) cases checked. Raises ``AssertionError`` naming the first broken one."""
    method = get_method(name)
    model, inv = tiny_inventory(seed)
    assert method.color.startswith("#"), f"{name}: color {method.color!r} is not #rrggbb"
    cases = 0
    for layer in inv:
        if not method.applies_to(layer):
            continue
        dense = model.get_submodule(layer.name)
        w = dense.weight.detach()
        b = dense.bias.detach() if dense.bias is not None else None
        x = torch.randn(4, *layer_input(layer))
        for keep in KEEPS:
            spec = method.spec_at(layer, keep, factorization=_Space.factorizations.get(
                layer.kind))
            smallest = bool(spec and spec.rank) and set(spec.rank) == {1}  # the floor
            if spec is not None and spec.method != "dense" and not smallest:
                weights = layer_cost(layer, spec).params - (layer.out_chs if layer.bias else 0)
                assert weights <= keep * layer.weight_numel + 1, (  # + rounding to a count
                    f"{name}.spec_at({layer.name}, {keep}) keeps {weights} of "
                    f"{layer.weight_numel} weights")
        for spec in _specs(method, layer):
            where = f"{name} on {layer.name} ({layer.kind}) at {spec}"
            assert isinstance(method.label(spec), str) and method.label(spec), where
            module, err = method.compress(w, b, layer, spec)
            module.eval()
            counted, measured = layer_cost(layer, spec), cost(module, layer_input(layer))
            assert (counted.params, counted.macs) == (measured.params, measured.macs), (
                f"{where}: counts {counted.params} params / {counted.macs} MACs, builds "
                f"{measured.params} / {measured.macs}")
            assert 0.0 <= err <= 1.0 + 1e-6, f"{where}: relative error {err}"
            with torch.no_grad():
                y, y_dense = module(x), dense(x)
            assert y.shape == y_dense.shape and torch.isfinite(y).all(), where
            skel = method.skeleton(layer, spec)
            assert {k: v.shape for k, v in skel.state_dict().items()} == {
                k: v.shape for k, v in module.state_dict().items()}, f"{where}: skeleton"
            skel.load_state_dict(module.state_dict())
            with torch.no_grad():
                torch.testing.assert_close(skel.eval()(x), y, msg=f"{where}: skeleton output")
            _check_forms(module, layer, spec, x, y, where)
            cases += 1
    assert cases, f"{name} applies to no layer kind"
    return cases


def _check_forms(module, layer, spec, x, y, where) -> None:
    import copy

    from autohybrid.deploy import deploy_module, forms_for

    for form in forms_for(layer, spec):
        deployed = deploy_module(copy.deepcopy(module), layer, spec, form).eval()
        with torch.no_grad():
            got = deployed(x)
        err = float((got - y).norm() / y.norm().clamp_min(1e-12))
        assert err <= 1e-5, f"{where}: deploy form {form!r} is off by {err:.2e} (relative)"


class MethodContract:
    """pytest: ``class TestMine(MethodContract): method = "mine"``."""

    method: str = ""

    def test_method_contract(self):
        assert self.method in METHODS, f"{self.method!r} is not registered"
        check_method(self.method)
