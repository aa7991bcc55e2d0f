"""The latency table: its cache key, its arithmetic, and that a layer is never exported in a
form slower than the one the table timed."""

from __future__ import annotations

import json

import pytest
import torch

import autohybrid as ah
from autohybrid import latency as lat
from autohybrid.cost import allocation_cost
from autohybrid.deploy import Branches, CSRLinear, deploy, forms_for
from autohybrid.exceptions import ConfigError
from autohybrid.export import export, load
from autohybrid.search_space import SearchSpace
from autohybrid.spec import LayerSpec
from autohybrid.testing import TINY_INPUT, tiny_inventory

MODEL, INV = tiny_inventory()
SPACE = SearchSpace(name="tiny", methods={"linear": ["sparse", "svd", "lowrank+sparse"]},
                    factorizations={"linear": "svd"})


@pytest.fixture
def fake_timer(monkeypatch):
    """Deterministic 'timings': a form's ratio is a fixed number per form; counts calls."""
    calls = []
    ratio = {"__dense__": 1.0, "chain": 0.6, "branches": 1.4, "branches-csr": 1.8, "csr": 0.5,
             "bsr": 0.4,
             "model": 1.0, "built": 1.0, "probe": 0.9}

    def timer(fns, reference, rounds=lat.ROUNDS, min_call_s=lat.MIN_CALL_S):
        calls.append(sorted(fns))
        t = 0.02 if reference in ("model", "dense") else 1e-3  # the model 20x a layer
        return {n: ratio.get(n, 1.0) for n in fns}, t

    monkeypatch.setattr(lat, "time_interleaved", timer)
    monkeypatch.setattr(lat, "in_model_seconds", lambda model, names, x: dict.fromkeys(
        names, 1e-3))  # each layer inside the model as long as alone
    return calls


def measure(tmp_path, **kw):
    opts = dict(runtime="torch", threads=1, batch=1, folder=tmp_path, progress=False,
                levels=(0.5, 0.2), shares=(0.5,))
    opts.update(kw)
    return lat.measure_table(MODEL, INV, SPACE, **opts)


def test_cache_key_names_machine_runtime_threads_input_size_batch(tmp_path, fake_timer):
    key = lat.table_key("torch", 1, TINY_INPUT, 1, INV.fingerprint)
    assert {"machine", "runtime", "threads", "input_size", "batch", "fingerprint"} <= set(key)
    assert key["machine"] == lat.machine_id() and key["input_size"] == list(TINY_INPUT)
    paths = {lat.LatencyTable.path_for(tmp_path, lat.table_key(*args, INV.fingerprint,
                                                                machine=m))
             for *args, m in [("torch", 1, TINY_INPUT, 1, "a"), ("torch", 2, TINY_INPUT, 1, "a"),
                              ("onnxruntime", 1, TINY_INPUT, 1, "a"),
                              ("torch", 1, (3, 16, 16), 1, "a"), ("torch", 1, TINY_INPUT, 8, "a"),
                              ("torch", 1, TINY_INPUT, 1, "b")]}
    assert len(paths) == 6  # every part of the key makes another file

    table = measure(tmp_path)
    first = len(fake_timer)
    assert first > 0 and table.model_s > 0
    again = measure(tmp_path)  # cached: nothing timed but the dense model (the drift check)
    assert fake_timer[first:] == [["model"]] and again.to_dict() == table.to_dict()
    first += 1
    measure(tmp_path, threads=2)  # other threads: measured anew, in another file
    assert len(fake_timer) > first
    assert len(list(tmp_path.glob("latency-torch-*.json"))) == 2
    stored = json.loads(lat.LatencyTable.path_for(tmp_path, table.key).read_text())
    assert stored["key"]["threads"] == 1


def test_alpha_makes_each_methods_fastest_model_predict_what_it_measured(tmp_path,
                                                                         fake_timer):
    table = measure(tmp_path)
    alphas = dict(table.alphas)
    # the fake chain (0.6) and CSR (0.5) forms are faster than the dense layer, the
    # two-branch L+S forms (1.4, 1.8) are not: no probe of L+S
    assert set(alphas) == {"svd", "sparse"}
    default, promised = table.alpha, {}
    for method, alpha in alphas.items():
        probe = lat.probe_layers(table, INV, 0.0, method)
        assert probe and {s.method for s in probe.values()} == {method}
        table.alpha, table.alphas = 1.0, {}
        promised[method] = table.model_s - table.predict(INV, probe)  # the layers' sum
        assert alpha == pytest.approx(min(5.0, max(0.2, 0.1 * table.model_s /
                                                   promised[method])))
        table.alpha, table.alphas = default, alphas
        assert table.fraction(INV, probe) == pytest.approx(0.9)  # the probe's fake ratio
    assert default == alphas[max(promised, key=promised.get)]  # the largest saving's


def test_each_method_saves_by_its_own_alpha(tmp_path, fake_timer):
    """A sparse kernel and a low-rank chain gain differently inside the model: each
    method's savings are scaled by the alpha its own probe measured."""
    table = measure(tmp_path)
    tok = INV.by_name["tok"]
    chain, csr = ah.LayerSpec("svd", rank=(4,)), ah.LayerSpec("sparse", sparsity=0.8)
    for spec, r in ((chain, 0.25), (csr, 0.5)):
        k = lat.spec_key(spec)
        table.rows["tok"][k] = {"chain" if spec is chain else "csr": r, "dense": 1.0}
        table.kept["tok"][k] = lat.kept_fraction(tok, spec)
        table.families["tok"][k] = lat._family(tok, spec)
    table._curves = {}
    table.model_s, table.in_model_s["tok"], table.alpha = 0.010, 0.004, 0.7
    table.alphas = {"svd": 1.5, "sparse": 0.5}
    r_chain, r_csr = table.ratio(tok, chain), table.ratio(tok, csr)
    assert table.predict(INV, {"tok": chain}) == pytest.approx(0.010 - 1.5 * 0.004 *
                                                               (1 - r_chain))
    assert table.predict(INV, {"tok": csr}) == pytest.approx(0.010 - 0.5 * 0.004 * (1 - r_csr))
    table.alphas = {"svd": 1.5}  # a method with no probe of its own takes the default
    assert table.predict(INV, {"tok": csr}) == pytest.approx(0.010 - 0.7 * 0.004 * (1 - r_csr))


def test_alpha_probes_every_faster_layer_at_one_common_ratio(tmp_path, fake_timer):
    """alpha is measured on a probe spread like a searched allocation (every layer that can
    be faster, at about the same ratio), not on the few layers that save most, each at its
    fastest: that probe gave ViT-tiny at batch 64 alphas of 0.83 and 1.30."""
    table = measure(tmp_path)
    table.rows, table.kept, table.families, table._curves = {}, {}, {}, {}
    specs = {r: ah.LayerSpec("svd", rank=(r,)) for r in (1, 2, 3)}
    for name in ("tok", "head"):
        layer = INV.by_name[name]
        table.rows[name], table.kept[name], table.families[name] = {}, {}, {}
        for rank, ratio in ((1, 0.2), (2, 0.5), (3, 0.8)):
            k = lat.spec_key(specs[rank])
            table.rows[name][k] = {"chain": ratio, "dense": 1.0}
            table.kept[name][k] = lat.kept_fraction(layer, specs[rank])
            table.families[name][k] = lat._family(layer, specs[rank])
        table.in_model_s[name] = 0.004
    table.model_s, table.alpha, table.alphas = 0.010, 1.0, {}
    # both at rank 2 save 2 * 0.004 * 0.5: 0.6 of the dense time; at rank 3, 0.84
    assert lat.probe_layers(table, INV, 0.6) == {"tok": specs[2], "head": specs[2]}
    assert lat.probe_layers(table, INV, 0.7) == {"tok": specs[2], "head": specs[2]}
    assert lat.probe_layers(table, INV, 0.9) == {"tok": specs[3], "head": specs[3]}
    assert lat.probe_layers(table, INV, 0.0) == {"tok": specs[1], "head": specs[1]}
    assert lat.probe_layers(table, INV, 0.1) == {"tok": specs[1], "head": specs[1]}


def test_a_table_probed_the_old_way_is_probed_again(tmp_path, fake_timer):
    table = measure(tmp_path, probe=0.7)
    assert table.alpha_probe == lat.PROBE
    path = lat.LatencyTable.path_for(tmp_path, table.key)
    stored = json.loads(path.read_text())
    assert measure(tmp_path, probe=0.7).to_dict() == stored  # probed: kept as it is
    first = len(fake_timer)
    stored["alpha_probe"], stored["alpha"] = 0, 3.0  # a table probed before PROBE
    path.write_text(json.dumps(stored))
    again = measure(tmp_path, probe=0.7)
    assert ["dense", "probe"] in fake_timer[first:]  # alpha timed anew, nothing else
    assert again.alpha_probe == lat.PROBE and again.alpha == table.alpha
    assert again.rows == table.rows


def test_an_unknown_runtime_is_refused():
    with pytest.raises(ConfigError, match="unknown runtime 'tflite'"):
        lat.table_key("tflite", 1, TINY_INPUT, 1, INV.fingerprint)


def test_prediction_is_the_dense_time_less_what_each_layer_saves(tmp_path, fake_timer):
    table = measure(tmp_path)
    tok = INV.by_name["tok"]
    spec = ah.LayerSpec("svd", rank=(4,))
    table.rows["tok"], table._curves = {}, {}
    table.rows["tok"][lat.spec_key(spec)] = {"chain": 0.25, "dense": 1.0}
    table.kept["tok"][lat.spec_key(spec)] = lat.kept_fraction(tok, spec)
    table.families["tok"][lat.spec_key(spec)] = lat._family(tok, spec)
    table.model_s, table.dense_s["tok"], table.alpha, table.alphas = 0.010, 0.004, 1.0, {}
    table.in_model_s["tok"] = 0.004
    assert table.ratio(tok, spec) == 0.25
    assert table.predict(INV, {"tok": spec}) == pytest.approx(0.010 - 0.004 * 0.75)
    table.alpha = 0.5  # the whole model saved half what its layers alone promised
    assert table.predict(INV, {"tok": spec}) == pytest.approx(0.010 - 0.5 * 0.004 * 0.75)
    table.alpha = 1.0
    c = allocation_cost(INV, {"tok": spec}, table)
    assert c.fraction("latency") == pytest.approx(0.7)
    assert c.params == allocation_cost(INV, {"tok": spec}).params
    with pytest.raises(ConfigError, match="latency table"):
        allocation_cost(INV, {"tok": spec}).fraction("latency")


def test_between_levels_the_ratio_is_interpolated_and_never_falls_as_kept_rises(
        tmp_path, fake_timer):
    table = measure(tmp_path)
    tok = INV.by_name["tok"]
    table.rows["tok"] = {}
    table.kept["tok"], table.families["tok"] = {}, {}
    for rank, ratio in ((2, 0.3), (8, 0.5), (12, 0.45)):  # a noisy dip at rank 12
        s = ah.LayerSpec("svd", rank=(rank,))
        k = lat.spec_key(s)
        table.rows["tok"][k] = {"chain": ratio, "dense": 1.0}
        table.kept["tok"][k], table.families["tok"][k] = lat.kept_fraction(tok, s), \
            lat._family(tok, s)
    table._curves.clear()
    ratios = [table.ratio(tok, ah.LayerSpec("svd", rank=(r,))) for r in range(2, 13)]
    assert ratios[0] == 0.3 and ratios[6] == 0.5
    assert 0.3 < table.ratio(tok, ah.LayerSpec("svd", rank=(5,))) < 0.5
    assert all(b >= a for a, b in zip(ratios, ratios[1:]))  # the dip is not believed


def test_a_spec_is_never_exported_slower_than_the_form_the_table_timed(tmp_path, fake_timer):
    table = measure(tmp_path)
    tok = INV.by_name["tok"]
    layers = {"tok": ah.LayerSpec("sparse", sparsity=0.9),
              "head": ah.LayerSpec("lowrank+sparse", factorization="svd", rank=(2,),
                                   sparsity=0.95)}
    # a spec between the table's levels is measured before its form is chosen
    assert table.forms("tok", layers["tok"]) is None
    forms = lat.best_forms(table, INV, layers)
    for name, spec in layers.items():
        timed = table.forms(name, spec)
        assert timed is not None and set(timed) == set(forms_for(INV.by_name[name], spec))
        assert timed[forms[name]] == min(timed.values())
    assert forms == {"tok": "csr", "head": "dense"}  # the fake timer's fastest

    small = ah.apply(MODEL, ah.Allocation.for_inventory(INV, layers), INV)
    alloc = ah.Allocation.for_inventory(INV, layers)
    alloc.meta["deploy"] = {"runtime": "torch", "forms": forms}
    export(small, alloc, tmp_path / "m")
    fast = load(tmp_path / "m", model=tiny_inventory()[0], deploy=True)
    assert isinstance(fast.get_submodule("tok"), CSRLinear)
    assert isinstance(fast.get_submodule("head"), torch.nn.Linear)  # folded L + S
    x = torch.randn(4, *TINY_INPUT)
    with torch.no_grad():
        want, got = small.eval()(x), fast(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert tok.name == "tok"


def test_without_recorded_forms_deploy_precomputes_the_sparse_parts():
    layers = {"tok": ah.LayerSpec("lowrank+sparse", factorization="svd", rank=(3,),
                                  sparsity=0.8)}
    small = ah.apply(MODEL, ah.Allocation.for_inventory(INV, layers), INV)
    import copy

    fast = deploy(copy.deepcopy(small), layers, {}, INV)
    branch = fast.get_submodule("tok")
    assert isinstance(branch, Branches) and isinstance(branch.sparse, torch.nn.Linear)
    x = torch.randn(2, *TINY_INPUT)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), small.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_form_a_layer_cannot_take_is_refused():
    from autohybrid.deploy import deploy_module

    layer = INV.by_name["conv"]  # 3x3, stride 2: no CSR form
    spec = ah.LayerSpec("sparse", sparsity=0.5)
    module = lat.random_module(layer, spec)
    with pytest.raises(ConfigError, match="does not apply"):
        deploy_module(module, layer, spec, "csr")


def test_real_timing_of_a_tiny_table_is_finite_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setattr(lat, "ROUNDS", 3)
    monkeypatch.setattr(lat, "MIN_CALL_S", 2e-4)
    table = lat.measure_table(MODEL, INV, SearchSpace(name="t", methods={"linear": ["svd"]}),
                              threads=1, folder=tmp_path, progress=False, levels=(0.3,))
    assert set(table.dense_s) == {"tok", "head"}
    for rows in table.rows.values():
        for forms in rows.values():
            assert set(forms) == {"chain", "dense"} and forms["dense"] == 1.0
            assert 0 < forms["chain"] < 1e3
    assert 0 < table.fraction(INV, {}) == 1.0


def test_speed_columns_of_a_random_model_in_its_forms():
    layers = {"tok": LayerSpec("svd", rank=(2,))}
    model = lat.random_model(MODEL, INV, layers, {"tok": "chain"})
    cols = lat.speed(model, MODEL, TINY_INPUT, [1, 4], threads=1)
    assert set(cols) == {f"{k}_b{b}" for k in ("latency_ratio", "latency_ms", "dense_ms")
                         for b in (1, 4)}
    assert all(v > 0 for v in cols.values())


def test_onnxruntime_tables_time_the_exported_forms(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(lat, "ROUNDS", 3)
    monkeypatch.setattr(lat, "MIN_CALL_S", 2e-4)
    space = SearchSpace(name="t", methods={"linear": ["sparse", "lowrank+sparse"]},
                        factorizations={"linear": "svd"})
    table = lat.measure_table(MODEL, INV, space, runtime="onnxruntime", threads=1,
                              folder=tmp_path, progress=False, levels=(0.3,), shares=(0.5,))
    assert table.key["runtime"] == "onnxruntime"
    forms = {f for rows in table.rows.values() for fs in rows.values() for f in fs}
    assert forms == {"dense", "branches"}  # no CSR: ONNX has no sparse matmul to export
    assert all(0 < r < 1e3 for rows in table.rows.values() for fs in rows.values()
               for r in fs.values())


def test_a_pattern_the_table_has_no_level_of_reads_its_method_curve(tmp_path, fake_timer):
    table = measure(tmp_path)
    tok = INV.by_name["tok"]
    nm = ah.LayerSpec("sparse", sparsity=0.5, pattern="2:4")
    plain = ah.LayerSpec("sparse", sparsity=0.5)
    assert table.ratio(tok, nm) == table.ratio(tok, plain)
    with pytest.raises(ConfigError, match="no tt entry"):
        table.ratio(tok, ah.LayerSpec("tt", rank=(2,)))


def test_in_model_layer_times_add_up_to_no_more_than_the_model():
    x = torch.randn(1, *TINY_INPUT)
    names = [la.name for la in INV]
    inside = lat.in_model_seconds(MODEL, names, x, rounds=5)
    assert set(inside) == set(names) and all(v > 0 for v in inside.values())
    _, whole = lat.time_interleaved({"m": lambda: MODEL(x)}, "m", rounds=5)
    assert sum(inside.values()) <= 1.5 * whole  # parts of one forward, not of many
    assert not MODEL._forward_hooks and not MODEL.tok._forward_pre_hooks


def test_the_latency_metric_adds_block_sparse_and_exports_it_as_bsr(tmp_path, fake_timer):
    space = SPACE.for_latency()
    assert "block-sparse" in space.methods["linear"]
    assert "block-sparse" not in SPACE.methods["linear"]  # params / MACs searches: left out
    table = lat.measure_table(MODEL, INV, space, runtime="torch", threads=1, batch=1,
                              folder=tmp_path, progress=False, levels=(0.5, 0.2),
                              shares=(0.5,))
    tok = INV.by_name["tok"]  # 24 -> 36: 4x4 blocks tile it; head (36 -> 5) takes none
    block = [k for k, f in table.families["tok"].items() if f.startswith("block-sparse|")]
    assert len(block) == 2 and all(set(table.rows["tok"][k]) == {"dense", "bsr"}
                                   for k in block)
    assert not any(f.startswith("block-sparse|") for f in table.families["head"].values())
    spec = ah.LayerSpec("block-sparse", sparsity=0.8, pattern="4x4")
    layers = {"tok": spec}
    forms = lat.best_forms(table, INV, layers)
    assert forms == {"tok": "bsr"}
    small = ah.apply(MODEL, ah.Allocation.for_inventory(INV, layers), INV)
    alloc = ah.Allocation.for_inventory(INV, layers)
    alloc.meta["deploy"] = {"runtime": "torch", "forms": forms}
    export(small, alloc, tmp_path / "m")
    fast = load(tmp_path / "m", model=tiny_inventory()[0], deploy=True)
    kernel = fast.get_submodule("tok")
    assert isinstance(kernel, CSRLinear) and kernel.weight_csr.layout == torch.sparse_bsr
    assert tuple(kernel.weight_csr.values().shape[1:]) == (4, 4)
    x = torch.randn(4, *TINY_INPUT)
    with torch.no_grad():
        want, got = small.eval()(x), fast(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert allocation_cost(INV, layers).params < allocation_cost(INV, {}).params
    assert tok.out_chs == 36


def test_a_table_from_a_machine_of_another_speed_is_measured_again(tmp_path, fake_timer,
                                                                    monkeypatch):
    table = measure(tmp_path)
    assert table.model_s == 0.02
    again = measure(tmp_path)  # the same speed: reused, nothing re-timed but the model
    assert again.rows == table.rows and again.model_s == table.model_s
    timer = lat.time_interleaved

    def slower(fns, reference, **kw):  # the same machine id, 2x slower
        ratios, t = timer(fns, reference, **kw)
        return ratios, 2 * t

    monkeypatch.setattr(lat, "time_interleaved", slower)
    with pytest.warns(UserWarning, match="measured again"):
        fresh = measure(tmp_path)
    assert fresh.model_s == pytest.approx(0.04)
    assert fresh.dense_s["tok"] == pytest.approx(2e-3)
    stored = json.loads(lat.LatencyTable.path_for(tmp_path, fresh.key).read_text())
    assert stored["model_s"] == pytest.approx(0.04)


def test_a_margin_makes_the_budget_count_the_prediction_that_much_higher(tmp_path, fake_timer):
    table = measure(tmp_path)
    layers = {"tok": ah.LayerSpec("svd", rank=(2,))}
    plain = table.fraction(INV, layers)
    assert plain == table.predicted_fraction(INV, layers) < 1.0
    table.margin = 0.05
    assert table.fraction(INV, layers) == pytest.approx(plain / 0.95)
    assert table.predicted_fraction(INV, layers) == plain
    cost = allocation_cost(INV, layers, table)
    assert cost.latency_fraction == pytest.approx(plain / 0.95)
    assert cost.fraction("latency") == cost.latency_fraction
