"""`autohybrid search` end to end on a tiny setup: outputs, re-application, parity, resume."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import autohybrid as ah
from autohybrid.config import SearchConfig
from autohybrid.data import load_data
from autohybrid.evaluate import evaluate
from autohybrid.models import create_model
from autohybrid.search.run import run_search

SPACE = """
name: tiny
include: ["layer3.*"]
methods: {conv: [sparse, tucker2, lowrank+sparse]}
factorizations: {conv: tucker2}
rank_ratios: [0.5, 0.25]
sparsities: [0.5, 0.9]
hybrid_rank_ratios: [0.25]
hybrid_sparsities: [0.9]
refine: 0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    ckpt = d / "r20.pth"
    torch.save(create_model("cifar_resnet20").state_dict(), ckpt)
    (d / "space.yaml").write_text(SPACE)
    cfg = SearchConfig(model="cifar_resnet20", checkpoint=str(ckpt), data="digits",
                       input_size=[3, 32, 32], budget=0.6, trials=5, population=4, calib=64,
                       batch_size=64, top_k=1, finetune_steps=2,
                       search_space=str(d / "space.yaml"), out=str(d / "out"))
    out = run_search(cfg)
    return cfg, out, ckpt


def test_outputs_exist(run):
    cfg, out, _ = run
    for name in ("pareto.csv", "report.html", "pareto.png", "allocation.png", "config.yaml",
                 "study.db", "sensitivity/sensitivity.csv", "sensitivity/sensitivity.html"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 3 and "<script" not in page
    assert not list(out.rglob(".*.tmp"))


def test_every_pareto_allocation_reapplies_within_budget(run):
    cfg, out, ckpt = run
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1 and (front.params_fraction <= cfg.budget).all()
    model = create_model("cifar_resnet20", checkpoint=ckpt)
    inv = ah.inventory(model, (3, 32, 32))
    for path in front.allocation:
        alloc = ah.Allocation.load(out / path, inventory=inv)
        small = ah.apply(model, alloc)
        assert ah.cost(small, (3, 32, 32)).params <= cfg.budget * inv.total_params


def test_exported_model_reproduces_reported_accuracy(run):
    cfg, out, _ = run
    front = pd.read_csv(out / "pareto.csv")
    best = front.dropna(subset=["model"]).iloc[0]
    model = ah.load(out / best.model)
    data = load_data("digits", model, input_size=(3, 32, 32))
    top1 = evaluate(model, data.test, progress=False)["top1"]
    assert abs(top1 - best.test_top1_after) <= 0.1


def test_rerun_resumes_without_new_work(run):
    cfg, out, _ = run
    before = pd.read_csv(out / "pareto.csv")
    import optuna

    n = len(optuna.load_study(study_name="cifar_resnet20-params-0.6",
                              storage=f"sqlite:///{out / 'study.db'}").trials)
    run_search(SearchConfig.from_dict(cfg.to_dict()))
    after = pd.read_csv(out / "pareto.csv")
    n2 = len(optuna.load_study(study_name="cifar_resnet20-params-0.6",
                               storage=f"sqlite:///{out / 'study.db'}").trials)
    assert n2 == n
    pd.testing.assert_frame_equal(before, after)
