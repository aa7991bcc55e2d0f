from __future__ import annotations

import pytest
import torch

import autohybrid as ah
from autohybrid.exceptions import ConfigError
from autohybrid.models import create_model
from autohybrid.report import write_sensitivity_report
from autohybrid.search_space import SearchSpace, load_search_space, read_search_space
from autohybrid.sensitivity import SensitivityTable, sensitivity, spec_from_row

LAYERS = ["layer2.0.conv1", "layer3.2.conv2"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    inv = ah.inventory(model, (3, 32, 32))
    space = load_search_space("cifar_resnet20")
    x = torch.randn(48, 3, 32, 32)
    y = torch.randint(0, 10, (48,))
    return model, inv, space, x, y


def run(setup, **kw):
    model, inv, space, x, y = setup
    return sensitivity(model, inv, space, x, y, batch_size=24, recal_images=24, progress=False,
                       layers=kw.pop("layers", LAYERS), **kw)


@pytest.mark.parametrize("bn_recal", [True, False])
def test_cached_cone_equals_naive_full_forward(setup, bn_recal):
    fast = run(setup, bn_recal=bn_recal)
    slow = run(setup, bn_recal=bn_recal, naive=True)
    cols = ["loss", "top1", "kl", "agreement", "rel_error"]
    torch.testing.assert_close(
        torch.tensor(fast.df[cols].values), torch.tensor(slow.df[cols].values),
        atol=1e-5, rtol=1e-5,
    )
    assert len(fast.df) == 12 * len(LAYERS)
    assert fast.meta["method"] == "cached-cone" and slow.meta["method"] == "naive"


def test_model_is_left_untouched(setup):
    model = setup[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(setup, bn_recal=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_rows_round_trip_to_specs_and_costs(setup):
    _, inv, space, _, _ = setup
    table = run(setup, bn_recal=False)
    for _, row in table.df.iterrows():
        spec = spec_from_row(row)
        assert spec in space.candidates(inv[row.layer])
        assert ah.layer_cost(inv[row.layer], spec).params == row.params


def test_cache_and_resume(setup, tmp_path):
    calls = []

    class Stop(Exception):
        pass

    def stop_after_first(name):
        calls.append(name)
        if len(calls) == 1:
            raise Stop

    with pytest.raises(Stop):
        run(setup, out_dir=tmp_path, on_layer=stop_after_first)
    assert len(list(tmp_path.glob(".sensitivity-*.partial.csv"))) == 1
    resumed = run(setup, out_dir=tmp_path, on_layer=calls.append)
    assert calls == [LAYERS[0], LAYERS[1]]  # the first layer was not redone
    assert not list(tmp_path.glob(".sensitivity-*.partial.csv"))
    cached = run(setup, out_dir=tmp_path, on_layer=calls.append)
    assert cached.meta.get("cached") and len(calls) == 2
    full = run(setup)
    cols = ["loss", "kl"]
    assert (abs(resumed.df[cols].values - full.df[cols].values) < 1e-6).all()
    other = run(setup, out_dir=tmp_path, key_extra={"data": "other"})  # another key
    assert not other.meta.get("cached")
    again = SensitivityTable.load(tmp_path)
    assert again.meta["key"] == other.meta["key"]


def test_report_writes_plots(setup, tmp_path):
    table = run(setup, bn_recal=False)
    paths = write_sensitivity_report(table, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["sensitivity.html", "sensitivity_curves.png", "sensitivity_heatmap.png"]
    page = (tmp_path / "sensitivity.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page and "http" not in page.split(
        "<svg")[0]


def test_builtin_search_spaces_load_and_pick_by_name():
    names = {"cifar_resnet20": "cifar_resnet", "resnet50": "resnet",
             "mobilenetv3_small_100": "mobilenetv3", "efficientnet_b0": "efficientnet",
             "vit_tiny_patch16_224": "vit", "convnext_atto": "default"}
    for model, space in names.items():
        assert load_search_space(model).name == space


def test_search_space_candidates_respect_rank_multiple():
    model = create_model("resnet18", num_classes=10)
    inv = ah.inventory(model, (3, 64, 64))
    space = load_search_space("resnet18")
    layers = space.compressible(inv)
    assert not any(".downsample." in la.name for la in layers)
    for la in layers:
        for spec in space.candidates(la):
            assert all(r % 8 == 0 or r == full for r, full in
                       zip(spec.rank, ah.get_method(spec.factorization or spec.method).max_rank(la)
                           if spec.rank else ()))


@pytest.mark.parametrize(
    "text,msg",
    [
        ("name: x\ncolour: red\n", "unknown key(s) ['colour']"),
        ("methods: {conv: [magic]}\n", "unknown method 'magic' for conv"),
        ("methods: {round: [sparse]}\n", "unknown layer kind 'round'"),
        ("rank_ratios: [0, 0.5]\n", "rank_ratios value 0 must be in (0, 1]"),
        ("sparsities: [1.0]\n", "sparsities value 1.0 must be in [0, 1)"),
        ("factorizations: {conv: sparse}\n", "is not low-rank"),
        ("methods: [unclosed\n", "malformed YAML"),
    ],
)
def test_bad_search_space_files(tmp_path, text, msg):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_search_space(p)
    assert msg in str(e.value)


def test_search_space_round_trip(tmp_path):
    space = load_search_space("vit_small_patch16_224")
    space.save(tmp_path / "s.yaml")
    assert read_search_space(tmp_path / "s.yaml") == space
    assert SearchSpace().digest != space.digest
