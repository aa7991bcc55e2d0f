from __future__ import annotations

import pytest
import yaml

import autohybrid as ah
from autohybrid.allocation import _uniform_builder
from autohybrid.exceptions import AllocationError, BudgetError, ConfigError
from tests.conftest import TINY_INPUT


@pytest.fixture
def inv(tiny):
    return ah.inventory(tiny, TINY_INPUT, model_name="tiny")  # also in test_inventory.py


@pytest.mark.parametrize("method", ["lowrank+sparse", "sparse", "lowrank", "svd", "tucker2"])
@pytest.mark.parametrize("metric", ["params", "macs"])
def test_uniform_lands_just_under_budget(inv, method, metric):
    budget = 0.6
    alloc = ah.Allocation.uniform(inv, method=method, budget=budget, metric=metric)
    frac = alloc.cost(inv).fraction(metric)
    assert frac <= budget
    # just under: one step up from the level it found crosses the budget
    level = alloc.meta["uniform"]["level"]
    build = _uniform_builder(method, 0.5, None)
    above = {la.name: build(la, level + 1e-6) for la in inv.compressible}
    assert level < 1
    assert ah.Allocation.for_inventory(inv, above).cost(inv).fraction(metric) > budget
    alloc.validate(inv)
    assert alloc.layers and not {"stem", "head"} & set(alloc.layers)


def test_uniform_unreachable_budget_names_smallest_fraction(inv):
    with pytest.raises(
        BudgetError, match=r"smallest reachable fraction with this method is 0\.\d+"
    ):
        ah.Allocation.uniform(inv, method="lowrank", budget=0.05)


@pytest.mark.parametrize("budget", [0, -0.2, 1.5, "half", None])
def test_bad_budget(inv, budget):
    with pytest.raises(BudgetError):
        ah.Allocation.uniform(inv, budget=budget)


def test_bad_metric(inv):
    with pytest.raises(ConfigError, match="unknown metric 'speeed'"):
        ah.Allocation.uniform(inv, budget=0.5, metric="speeed")
    with pytest.raises(ConfigError, match="needs the latency table"):  # measured, not counted
        ah.Allocation.uniform(inv, budget=0.5, metric="latency")


def test_save_load_round_trip(inv, tmp_path):
    alloc = ah.Allocation.uniform(inv, budget=0.5, metric="flops")
    assert alloc.metric == "macs"
    path = alloc.save(tmp_path / "a.yaml")
    again = ah.Allocation.load(path, inventory=inv)
    assert again.layers == alloc.layers and again.fingerprint == inv.fingerprint
    assert again.model["name"] == "tiny" and again.model["input_size"] == [3, 12, 12]
    assert not list(tmp_path.glob(".*tmp"))


def _write(tmp_path, inv, mutate):
    d = ah.Allocation.uniform(inv, budget=0.5).to_dict()
    mutate(d)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (
            lambda d: d.update(fingerprint="0123456789abcdef"),
            "create the allocation for this model",
        ),
        (
            lambda d: d["layers"].update({"blocks.9.fc": {"method": "sparse", "sparsity": 0.5}}),
            "layer 'blocks.9.fc' is not in the model",
        ),
        (
            lambda d: d["layers"].update({"convv": {"method": "sparse", "sparsity": 0.5}}),
            "did you mean conv",
        ),
        (
            lambda d: d["layers"].update({"conv": {"method": "tucker2", "rank": [100, 4]}}),
            "layer 'conv': tucker2 rank [100, 4] exceeds the full rank [8, 12]",
        ),
        (
            lambda d: d["layers"].update({"dw": {"method": "svd", "rank": [2]}}),
            "layer 'dw': method 'svd' does not apply to depthwise",
        ),
        (
            lambda d: d["layers"].update({"pw": {"method": "sparse", "sparsity": 1.2}}),
            "layer 'pw': sparsity 1.2 is outside [0, 1)",
        ),
        (
            lambda d: d["layers"].update({"pw": {"method": "sparse", "sparsity": "lots"}}),
            "sparsity must be a number",
        ),
        (
            lambda d: d["layers"].update({"pw": {"method": "sparse", "ratio": 0.5}}),
            "unknown key(s) ['ratio']",
        ),
        (lambda d: d["layers"].update({"pw": {"method": "magic"}}), "unknown method 'magic'"),
        (lambda d: d.update(version=7), "allocation version 7 is not supported"),
        (lambda d: d.update(colour="red"), "unknown key(s) ['colour']"),
        (lambda d: d.pop("fingerprint"), "missing key 'fingerprint'"),
    ],
)
def test_bad_allocation_files_name_the_problem(tmp_path, inv, mutate, msg):
    path = _write(tmp_path, inv, mutate)
    with pytest.raises(AllocationError) as e:
        ah.Allocation.load(path, inventory=inv)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("version: 1\nlayers: [unclosed\n")
    with pytest.raises(AllocationError, match="malformed YAML at line"):
        ah.Allocation.load(p)
    with pytest.raises(AllocationError, match="not found"):
        ah.Allocation.load(tmp_path / "missing.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(AllocationError, match="expected a mapping"):
        ah.Allocation.load(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("!!python/object/apply:os.system ['echo pwned > /tmp/ah_pwned']\n")
    with pytest.raises(AllocationError, match="malformed YAML"):
        ah.Allocation.load(p)
