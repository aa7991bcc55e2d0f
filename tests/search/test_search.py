"""The study on a small setup: budget is a hard constraint, warm starts, determinism, pareto."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

import autohybrid as ah
from autohybrid.config import SearchConfig
from autohybrid.exceptions import BudgetError
from autohybrid.models import create_model
from autohybrid.search.local import apply_move, moves
from autohybrid.search.objective import Evaluator, NumericalError
from autohybrid.search.params import ParamSpace, group_layers
from autohybrid.search.run import check_reachable, smallest_fraction, write_front
from autohybrid.search.study import SearchStudy, pareto_front, trial_layers
from autohybrid.search.surrogate import Surrogate
from autohybrid.search.warm_start import warm_starts
from autohybrid.search_space import SearchSpace
from autohybrid.sensitivity import sensitivity

SPACE = SearchSpace(
    name="tiny", include=["layer3.*"], methods={"conv": ["sparse", "tucker2", "lowrank+sparse"]},
    factorizations={"conv": "tucker2"}, rank_ratios=[0.5, 0.25], sparsities=[0.5, 0.9],
    hybrid_rank_ratios=[0.25], hybrid_sparsities=[0.9], refine=0,
)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    inv = ah.inventory(model, (3, 32, 32))
    table = sensitivity(model, inv, SPACE, x, y, bn_recal=False, progress=False)
    return model, inv, x, y, table


def make_study(parts, tmp_path, budget=0.6, trials=6, seed=0, storage=None, evaluator=None,
               local_search=0.3):
    model, inv, x, y, table = parts
    cfg = SearchConfig(model="cifar_resnet20", budget=budget, trials=trials, population=4,
                       seed=seed, calib=len(x), candidates=0, out=str(tmp_path),
                       local_search=local_search)
    groups = group_layers(SPACE, inv, table.df, cfg.max_groups, seed)
    ps = ParamSpace(SPACE, inv, groups, cfg.metric)
    ev = evaluator or Evaluator(model, inv, x, y, bn_recal=False, batch_size=32)
    tmp_path.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{tmp_path / 'study.db'}"
    ss = SearchStudy(cfg, optuna.storages.RDBStorage(storage), "s", ps, ev,
                     Surrogate(table.df, inv), {"name": "cifar_resnet20"})
    ss.open(warm_starts(ps, table.df, model, budget))
    return ss


def test_budget_is_hard_and_warm_starts_come_first(parts, tmp_path):
    ss = make_study(parts, tmp_path)
    study = ss.run()
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 6
    for t in done:
        assert t.values[1] <= 0.6 + 1e-12 and t.user_attrs["constraint"] <= 1e-12
        assert ah.Allocation.for_inventory(parts[1], trial_layers(t)).cost(parts[1]).fraction(
            "params") == pytest.approx(t.values[1])
        assert "predicted" in t.user_attrs and "top1" in t.user_attrs
    starts = [t.user_attrs.get("warm_start") for t in trials[:4]]
    assert set(starts) == {"uniform", "greedy", "global_magnitude", "error_threshold"}
    front = pareto_front(trials, 0.6)
    assert front and front[0].values[0] <= min(t.values[0] for t in done) + 1e-12
    # repaired trials land close to the budget, not far below it
    searched = [t for t in done if not t.user_attrs.get("warm_start")]
    assert all(t.values[1] > 0.45 for t in searched)


def test_same_seed_same_first_trials(parts, tmp_path):
    """Same seed: the same trials, sampled ones included; another seed samples others."""
    def sampled(study):
        return [t.params for t in study.get_trials()
                if not t.user_attrs.get("warm_start") and "local_of" not in t.user_attrs]

    a = make_study(parts, tmp_path / "a", trials=8, local_search=0).run()
    b = make_study(parts, tmp_path / "b", trials=8, local_search=0).run()
    c = make_study(parts, tmp_path / "c", trials=8, local_search=0, seed=1).run()
    assert len(sampled(a)) >= 3  # the comparison covers what the sampler drew
    assert [t.params for t in a.get_trials()] == [t.params for t in b.get_trials()]
    assert sampled(a) != sampled(c)


def test_resume_reaches_the_total_without_losing_trials(parts, tmp_path):
    ss = make_study(parts, tmp_path, trials=5)
    ss.run()
    before = {t.number: t.values for t in ss.study.get_trials(states=(TrialState.COMPLETE,))}
    again = make_study(parts, tmp_path, trials=8)  # same study, larger total
    assert not again.leader
    study = again.run()
    after = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in before.items())
    assert len(after) >= 8
    starts = [t.user_attrs.get("warm_start") for t in study.get_trials()]
    assert starts.count("uniform") == 1  # warm starts are enqueued once


def test_a_mixed_space_enqueues_every_familys_uniform_start_at_24_trials(parts, tmp_path):
    """At the benchmarks' 24 trials (7 of them local moves) the warm starts get 11 trials:
    the classic four, the per-family thresholds and both family uniform starts (at a third
    of the trials, before, the family uniform starts were cut off)."""
    model, inv, x, y, table = parts
    ss = make_study(parts, tmp_path, trials=24)
    warm = warm_starts(ss.ps, table.df, model, 0.6)
    enqueued = [t.user_attrs.get("warm_start") for t in ss.study.get_trials()]
    assert len(warm) > 8 and enqueued == list(warm)[:11]
    assert {"uniform_sparse", "uniform_lowrank"} <= set(enqueued)


def test_study_with_other_settings_is_refused(parts, tmp_path):
    make_study(parts, tmp_path, trials=4).run()
    with pytest.raises(ah.AutohybridError, match="was started with budget=0.6"):
        make_study(parts, tmp_path, budget=0.5)


def test_nan_trial_is_failed_with_reason_and_search_goes_on(parts, tmp_path):
    model, inv, x, y, _ = parts

    class Flaky(Evaluator):
        calls = 0

        def score(self, layers):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise NumericalError("the compressed model produced NaN/inf outputs")
            return super().score(layers)

    ss = make_study(parts, tmp_path, trials=5,
                    evaluator=Flaky(model, inv, x, y, bn_recal=False, batch_size=32))
    study = ss.run()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "NaN" in failed[0].user_attrs["fail_reason"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) >= 5


def test_unreachable_budget_names_smallest_fraction(parts):
    model, inv, x, y, table = parts
    ps = ParamSpace(SPACE, inv, group_layers(SPACE, inv, table.df, 24, 0), "params")
    low = smallest_fraction(ps)
    assert 0.1 < low < 0.6  # layers 1-2 and the stem stay dense in this space
    with pytest.raises(BudgetError, match=rf"smallest reachable fraction is {low:.3f}; raise "):
        check_reachable(ps, low - 0.01)
    assert check_reachable(ps, low) == low


def test_pareto_writes_reappliable_allocations(parts, tmp_path, capsys):
    from autohybrid.cli.main import main

    ss = make_study(parts, tmp_path, trials=4)
    ss.run()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["pareto", "--storage", url, "--out", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    files = sorted((tmp_path / "p" / "allocations").glob("trial-*.yaml"))
    assert files and "Pareto front within budget 0.6" in text
    model, inv = parts[0], parts[1]
    for f in files:
        alloc = ah.Allocation.load(f, inventory=inv)
        assert alloc.cost(inv).params_fraction <= 0.6
        small = ah.apply(model, alloc)
        assert ah.cost(small, (3, 32, 32)).params == alloc.cost(inv).params
    write_front(ss.study, tmp_path / "q", 0.6)
    assert len(list((tmp_path / "q" / "allocations").glob("*.yaml"))) == len(files)


def test_local_moves_change_one_layer_within_budget(parts):
    model, inv, x, y, table = parts
    ps = ParamSpace(SPACE, inv, group_layers(SPACE, inv, table.df, 24, 0), "params")
    start = warm_starts(ps, table.df, model, 0.6)["global_magnitude"]
    found = moves(ps, start, 0.6, Surrogate(table.df, inv))
    assert [m.predicted for m in found] == sorted(m.predicted for m in found)
    assert {m.spec.method for m in found} == {"tucker2", "lowrank+sparse"}  # all sparse now
    assert {m.layer for m in found} == set(start)
    for m in found:
        after = apply_move(start, m)
        assert {n for n in start if after.get(n) != start[n]} == {m.layer}
        frac = ah.Allocation.for_inventory(inv, after).cost(inv).params_fraction
        # equal cost: the moved layer takes what it had plus the slack, ranks are integers
        assert 0.6 - 0.01 < frac <= 0.6 + 1e-12
    # three sparse shares of low-rank + sparse, one tucker2, per layer
    assert len(found) == 4 * len(start)


def test_local_search_spends_the_last_trials_on_moves_around_the_best(parts, tmp_path):
    ss = make_study(parts, tmp_path, trials=10, local_search=0.5)
    study = ss.run()
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    local = [t for t in done if "local_of" in t.user_attrs]
    assert len(local) == 5 and done[-5:] == local
    by_number = {t.number: t for t in done}
    for t in local:
        parent = by_number[t.user_attrs["local_of"]]
        # the parent was the best trial when the move was made
        assert parent.values[0] == min(u.values[0] for u in done if u.number < t.number)
        a, b = trial_layers(parent), trial_layers(t)
        changed = {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}
        assert changed == {t.user_attrs["local_layer"]}
        assert t.values[1] <= 0.6 + 1e-12
    # each layer is tried once per incumbent before any layer is tried twice
    for parent in {t.user_attrs["local_of"] for t in local}:
        layers = [t.user_attrs["local_layer"] for t in local if t.user_attrs["local_of"] == parent]
        assert len(layers) == len(set(layers))
    off = make_study(parts, tmp_path / "off", trials=10, local_search=0.0).run()
    assert not any("local_of" in t.user_attrs for t in off.get_trials())


def test_local_search_resumes_with_the_moves_it_would_have_made(parts, tmp_path):
    whole = make_study(parts, tmp_path / "whole", trials=9, local_search=0.5).run()
    ss = make_study(parts, tmp_path / "cut", trials=9, local_search=0.5)

    def stop_in_local_phase(trial, study):
        if sum("local_of" in t.user_attrs for t in study.get_trials(
                states=(TrialState.COMPLETE,))) == 2:
            ss.stop()

    ss.on_trial = stop_in_local_phase
    ss.run()
    cut = make_study(parts, tmp_path / "cut", trials=9, local_search=0.5).run()

    def moves_of(study):
        return [(t.user_attrs["local_of"], t.user_attrs["local_move"], t.values)
                for t in study.get_trials(states=(TrialState.COMPLETE,))
                if "local_of" in t.user_attrs]

    assert len(moves_of(whole)) == 4 and moves_of(cut) == moves_of(whole)
    assert not cut.get_trials(states=(TrialState.WAITING,))


def test_a_move_that_failed_is_not_retried_from_the_next_incumbent(parts, tmp_path):
    study = make_study(parts, tmp_path, trials=14, local_search=0.7).run()
    done = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    local = [t for t in done.values() if "local_of" in t.user_attrs]
    failed = [t for t in local if t.values[0] >= done[t.user_attrs["local_of"]].values[0]]
    assert len({t.user_attrs["local_of"] for t in local}) >= 2 and failed
    for f in failed:
        later = [t for t in local if t.number > f.number]
        assert f.user_attrs["local_shape"] not in {t.user_attrs["local_shape"] for t in later}


@pytest.mark.parametrize("methods", [["sparse"], ["tucker2"]])
def test_warm_starts_keep_to_the_methods_the_space_allows(parts, methods):
    import dataclasses

    model, inv, x, y, table = parts
    space = dataclasses.replace(SPACE, methods={"conv": methods})
    df = table.df[table.df.method.isin(methods)]
    ps = ParamSpace(space, inv, group_layers(space, inv, df, 24, 0), "params")
    starts = warm_starts(ps, df, model, 0.6)
    assert "uniform" in starts
    if methods == ["sparse"]:
        assert "global_magnitude" in starts
    else:
        assert "global_magnitude" not in starts
    for name, layers in starts.items():
        assert layers and {s.method for s in layers.values()} <= set(methods), name
        assert ah.Allocation.for_inventory(inv, layers).cost(inv).params_fraction <= 0.6


def test_threshold_warm_starts_take_the_cheapest_candidate_in_the_budget_metric():
    """A tensor-train Linear holds few params and many MACs (16 tokens here): ranking a
    layer's candidates by params made greedy / error-threshold unreachable at MACs budgets."""
    from autohybrid.search.warm_start import threshold
    from autohybrid.search_space import load_search_space

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    inv = ah.inventory(model, (3, 32, 32))
    space = load_search_space("vit_tiny_patch16_224")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    df = sensitivity(model, inv, space, x, y, bn_recal=False, progress=False).df
    for metric in ("macs", "params"):
        ps = ParamSpace(space, inv, group_layers(space, inv, df, 24, 0), metric)
        for column in ("kl", "rel_error"):
            layers = threshold(ps, df, column, 0.5)
            assert layers is not None, (metric, column)
            assert ps.fraction(layers) <= 0.5
            if metric == "macs":
                assert all(s.method != "tt" for s in layers.values())


def test_mixed_spaces_get_threshold_starts_per_method_family(parts):
    model, inv, x, y, table = parts
    ps = ParamSpace(SPACE, inv, group_layers(SPACE, inv, table.df, 24, 0), "params")
    starts = warm_starts(ps, table.df, model, 0.6)
    family = {"sparse": {"sparse"}, "lowrank": {"tucker2"}, "hybrid": {"lowrank+sparse"}}
    extra = [k for k in starts if k.split("_")[-1] in family]
    assert extra and list(starts)[:4] == ["uniform", "greedy", "global_magnitude",
                                          "error_threshold"]
    for name in extra:
        assert {s.method for s in starts[name].values()} <= family[name.split("_")[-1]], name
    # the mixed space holds the uniform start of the space cut to each family
    for label in ("sparse", "lowrank"):
        start = starts[f"uniform_{label}"]
        assert {s.method for s in start.values()} == family[label]
        assert len(start) == sum(len(g.layers) for g in ps.groups)
        assert ps.fraction(start) <= 0.6 + 1e-9
    values = list(starts.values())
    assert all(values.count(v) == 1 for v in values)  # identical allocations kept once


def test_a_study_with_no_trial_within_the_budget_is_a_budget_error(tmp_path, monkeypatch):
    """When every trial (warm starts included) stays over the budget, the search says so as
    a budget error (exit 2 from the CLI) instead of ending 'done' with an empty front."""
    from types import SimpleNamespace

    from autohybrid.config import SearchConfig
    from autohybrid.exceptions import BudgetError
    from autohybrid.search import run as run_mod

    over = SimpleNamespace(state=optuna.trial.TrialState.COMPLETE, values=[0.1, 0.8],
                           user_attrs={"infeasible": True}, number=0)
    study = SimpleNamespace(get_trials=lambda deepcopy=False: [over])
    monkeypatch.setattr(run_mod, "setup_search", lambda cfg: SimpleNamespace())
    monkeypatch.setattr(run_mod, "run_study", lambda setup: study)
    cfg = SearchConfig(budget=0.7, metric="latency", out=str(tmp_path / "out"))
    with pytest.raises(BudgetError, match="none of the study's 1 trials is within the budget "
                                          "0.7 of latency.*--latency-margin"):
        run_mod.run_search(cfg)
    assert not (tmp_path / "out" / "pareto.csv").exists()


def test_layers_are_grouped_when_their_candidate_lists_differ_in_length(parts):
    """A small layer has fewer distinct candidates than a large one of the same kind (ranks
    that round to the same spec appear once): grouping still works, on profiles of the same
    length."""
    _, inv, _, _, table = parts
    df = table.df
    dropped = df[df.layer == "layer3.0.conv1"].index[-1]  # one candidate fewer for this layer
    short = df.drop(index=dropped)
    groups = group_layers(SPACE, inv, short, 3, 0)
    names = sorted(n for g in groups for n in g.layers)
    assert names == sorted(la.name for la in SPACE.compressible(inv))
    assert len(groups) == 3 and all(g.kind == "conv" for g in groups)
    # the same table with every list whole groups the layers on the table's own profiles
    assert len(group_layers(SPACE, inv, df, 3, 0)) == 3
