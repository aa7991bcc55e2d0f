"""``autohybrid.inventory``: the layers of a model, their kinds, sizes and exclusions."""

from __future__ import annotations

import pytest

import autohybrid as ah
from autohybrid.methods import applicable_methods
from tests.conftest import TINY_INPUT


@pytest.fixture
def inv(tiny):
    return ah.inventory(tiny, TINY_INPUT, model_name="tiny")


def test_inventory_lists_every_layer_and_excludes_stem_and_head(inv):
    names = [la.name for la in inv]
    assert names == ["stem", "conv", "pw", "dw", "grouped", "conv5", "tok", "head"]
    kinds = {la.name: la.kind for la in inv}
    assert kinds == {
        "stem": "conv",
        "conv": "conv",
        "pw": "pointwise",
        "dw": "depthwise",
        "grouped": "grouped",
        "conv5": "conv",
        "tok": "linear",
        "head": "linear",
    }
    assert [la.name for la in inv if la.excluded] == ["stem", "head"]
    assert inv["tok"].positions == 18 and inv["conv5"].out_hw == (3, 6)
    pw = applicable_methods(inv["pw"])
    assert "svd" in pw and "tucker2" not in pw
    assert applicable_methods(inv["dw"]) == ("dense", "sparse")


def test_inventory_totals_and_exclude_patterns(tiny, inv):
    assert inv.total_params == sum(p.numel() for p in tiny.parameters())
    assert inv.total_macs >= sum(la.macs for la in inv)
    custom = ah.inventory(tiny, TINY_INPUT, exclude=["c*"])
    assert {la.name for la in custom if la.excluded} == {"conv", "conv5"}
    assert custom.fingerprint == inv.fingerprint  # structure, not exclusion
