"""`--metric latency` end to end: the table feeds the search, every trial is within the
budget by its prediction, the returned model is exported in the forms the table timed
fastest and timed again in a fresh process.

The per-layer timings are made deterministic (a fixed ratio per form; the model 20x a layer),
so the budget and the forms do not depend on this machine's load; the fresh-process timing
of the returned model is real."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import autohybrid as ah
from autohybrid import latency as lat
from autohybrid.config import SearchConfig
from autohybrid.deploy import forms_for
from autohybrid.models import create_model
from autohybrid.search.run import run_search
from tests.search.test_pipeline import SPACE  # the same tiny layer3 space

RATIOS = {"chain": 0.5, "branches": 1.3, "branches-csr": 1.6, "csr": 0.9,
          "probe": 0.9,  # the probe (four layers, to the budget 0.9) saves what they promise
          "model": 0.85}  # a candidate timed beside the dense model: within the budget


def fake_timer(fns, reference, rounds=lat.ROUNDS, min_call_s=lat.MIN_CALL_S):
    t = 0.02 if reference in ("model", "dense") else 1e-3  # the model 20x a layer
    return {n: RATIOS.get(n, 1.0) for n in fns}, t


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("latency")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOHYBRID_CACHE", str(d / "cache"))  # never the user's real table
        mp.setattr(lat, "time_interleaved", fake_timer)
        mp.setattr(lat, "in_model_seconds", lambda model, names, x: dict.fromkeys(names, 1e-3))
        torch.manual_seed(0)
        ckpt = d / "r20.pth"
        torch.save(create_model("cifar_resnet20").state_dict(), ckpt)
        (d / "space.yaml").write_text(SPACE)
        cfg = SearchConfig(model="cifar_resnet20", checkpoint=str(ckpt), data="digits",
                           input_size=[3, 8, 8], budget=0.9, metric="latency", threads=1,
                           latency_margin=0.0,  # the fake table reaches 0.9 and no lower
                           trials=4, population=4, calib=64, batch_size=64, val=40,
                           candidates=2, finetune_steps=2, search_space=str(d / "space.yaml"),
                           out=str(d / "out"))
        out = run_search(cfg)
    return cfg, out, d


def test_the_table_is_cached_per_machine_outside_the_output_folder(run):
    cfg, out, d = run
    tables = list((d / "cache" / "latency").glob("latency-torch-*.json"))
    assert len(tables) == 1 and not list(out.rglob("latency-*.json"))
    table = lat.LatencyTable.from_dict(__import__("json").loads(tables[0].read_text()))
    assert table.key["threads"] == 1 and table.key["machine"] == lat.machine_id()
    # alpha probed at the budget: the probe's fake whole-model saving over what its layers
    # promise alone
    assert table.alpha_at == pytest.approx(cfg.budget * (1 - cfg.latency_margin))
    alphas, table.alpha, table.alphas = table.alphas, 1.0, {}
    inv = ah.inventory(create_model("cifar_resnet20"), (3, 8, 8))
    assert alphas  # one per method with a faster spec
    for method, alpha in alphas.items():
        probe = lat.probe_layers(table, inv, table.alpha_at, method)
        promised = 1.0 - table.fraction(inv, probe)
        assert alpha == pytest.approx(min(5.0, max(0.2, (1.0 - RATIOS["probe"]) / promised)))
    assert len(table.dense_s) == 6  # the space's layers (layer3.*)


def test_every_trial_is_within_the_latency_budget_by_its_prediction(run):
    import optuna

    cfg, out, _ = run
    study = optuna.load_study(study_name="cifar_resnet20-latency-0.9",
                              storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"
            and not t.user_attrs.get("infeasible")]
    assert done
    for t in done:
        assert t.user_attrs["latency_fraction"] <= cfg.budget + 1e-9
        assert t.values[1] == pytest.approx(t.user_attrs["latency_fraction"])
    front = pd.read_csv(out / "pareto.csv")
    assert (front.latency_fraction <= cfg.budget + 1e-4).all()


def test_the_returned_model_runs_in_the_forms_the_table_timed_fastest(run):
    cfg, out, d = run
    front = pd.read_csv(out / "pareto.csv")
    won = front[front.returned].iloc[0]
    alloc = ah.Allocation.load(out / won.model / "allocation.yaml")
    forms = alloc.meta["deploy"]["forms"]
    assert set(forms) == set(alloc.layers)
    for name, spec in alloc.layers.items():
        ratios = {f: RATIOS.get(f, 1.0) for f in forms_for(
            ah.inventory(create_model("cifar_resnet20"), (3, 8, 8)).by_name[name], spec)}
        assert ratios[forms[name]] == min(ratios.values()), (name, spec, forms[name])
    # timed again from its files in a fresh process (real timing), the prediction set
    # against it
    for col in ("fresh_latency_ratio_b1", "fresh_latency_ratio_b64", "prediction_error"):
        assert won[col] == won[col], col
    assert won.fresh_latency_ratio_b1 > 0
    page = (out / "report.html").read_text()
    assert "Speed" in page and "fresh process" in page
    assert "Latency kept, predicted" in page


def test_candidates_measuring_over_the_latency_budget_leave_the_pool(run, monkeypatch):
    """Before any fine-tune, each candidate is timed beside the dense model: one measuring
    over the budget leaves the pool (the prediction errs by a few percent), the measurements
    are kept for a resumed selection, and with none within, the fastest stays."""
    import json
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    from autohybrid.search.speed import within_measured

    cfg, out, d = run
    allocs = sorted((out / "allocations").glob("trial-*.yaml"))
    assert len(allocs) >= 2
    table = lat.LatencyTable.from_dict(json.loads(next(
        (d / "cache" / "latency").glob("latency-torch-*.json")).read_text()))
    model = create_model("cifar_resnet20")
    setup = SimpleNamespace(cfg=SearchConfig(budget=0.9, out=str(d / "measured")),
                            inv=ah.inventory(model, (3, 8, 8)), ps=SimpleNamespace(
                                latency=table), model=model, size=(3, 8, 8))
    pool = [SimpleNamespace(number=int(p.stem.split("-")[1])) for p in allocs[:2]]
    ratios = {pool[0].number: 0.95, pool[1].number: 0.88}
    timed = []

    def with_allocations(folder: Path) -> str:  # the output folder the selection reads
        (folder / "allocations").mkdir(parents=True)
        for p in allocs[:2]:
            shutil.copy(p, folder / "allocations" / p.name)
        return str(folder)

    def layers_key(layers) -> str:
        return json.dumps({k: v.to_dict() for k, v in layers.items()}, sort_keys=True)

    trial_of = {layers_key(ah.Allocation.load(p).layers): t.number
                for p, t in zip(allocs[:2], pool)}
    assert len(trial_of) == 2  # two distinct allocations

    def fake_measure(m, dense, size, batch, runtime, threads, repeats=1):
        timed.extend([trial_of[m]] * repeats)  # the random model stands for its trial
        return {"ratio": ratios[trial_of[m]]}

    monkeypatch.setattr("autohybrid.search.speed.random_model",
                        lambda model, inv, layers, forms: layers_key(layers))
    monkeypatch.setattr("autohybrid.search.speed.measure_model", fake_measure)
    setup.cfg.out = with_allocations(d / "measured")
    kept = within_measured(setup, pool)
    n = 2 * lat.REPEATS  # each candidate: the median of REPEATS measurements
    assert [t.number for t in kept] == [pool[1].number] and len(timed) == n
    again = within_measured(setup, pool)  # resumed: read back, not timed again
    assert [t.number for t in again] == [pool[1].number] and len(timed) == n
    ratios[pool[1].number] = 0.97
    setup.cfg.out = with_allocations(d / "measured-2")
    slowest_first = within_measured(setup, pool)
    assert [t.number for t in slowest_first] == [pool[0].number]  # none within: the fastest
