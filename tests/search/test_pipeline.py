"""`autohybrid search` end to end on a tiny setup: outputs, re-application, parity, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

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
                       input_size=[3, 16, 16], budget=0.6, trials=5, population=4, calib=64,
                       batch_size=64, val=100, candidates=3, finetune_steps=4,
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


def test_every_result_states_its_speed(run):
    """pareto.csv: each result's measured latency beside the dense model's at batch 1 and
    64, the runtime and threads; the returned one timed again in a fresh process."""
    cfg, out, _ = run
    front = pd.read_csv(out / "pareto.csv")
    for b in (1, 64):
        assert (front[f"latency_ratio_b{b}"] > 0).all() and (front[f"dense_ms_b{b}"] > 0).all()
    assert set(front.runtime) == {"torch"} and front.threads.notna().all()
    won = front[front.returned].iloc[0]
    assert won.fresh_latency_ratio_b1 > 0 and won.fresh_latency_ratio_b64 > 0
    assert "latency_fraction" not in front  # no table under a params budget
    assert (out / "speed.json").is_file()
    assert "Speed" in (out / "report.html").read_text()


def test_printed_front_is_a_line_a_trial_on_80_columns(run):
    """The front the search prints: one line per trial on an 80-column console, the origin
    in short (the whole of it is in pareto.csv)."""
    from io import StringIO

    from rich.console import Console

    from autohybrid.search.console import print_front

    _, out, _ = run
    rows = json.loads((out / "pareto.json").read_text())
    rows.append({**rows[0], "trial": 99, "origin": "local move from trial 7: "
                 "blocks.4.1.se.conv_reduce -> L+S svd (10,) 0.736"})
    console = Console(width=80, record=True, file=StringIO())
    print_front(rows, out=console)
    body = [line for line in console.export_text().splitlines() if line.startswith("│")]
    assert len(body) == len(rows)
    assert "move from 7" in body[-1] and "conv_reduce" not in body[-1]
    assert all(line.split("│")[1].strip().rstrip("*") == str(r["trial"])
               for line, r in zip(body, rows))
    front = pd.read_csv(out / "pareto.csv")
    assert front.origin.notna().all()  # the whole origin stays in the CSV


def test_candidates_are_halved_on_validation_and_one_is_returned(run):
    """Every candidate is refit sequentially and scored on the validation split at rung 0;
    each rung keeps the top 1/eta by validation top-1; one, fine-tuned in full, is returned
    and tested. The stage is an Optuna study in the search's storage."""
    import optuna

    cfg, out, _ = run
    front = pd.read_csv(out / "pareto.csv")
    rungs = [c for c in front if c.startswith("val_top1_step_")]
    assert rungs[0] == "val_top1_step_0" and rungs[-1] == f"val_top1_step_{cfg.finetune_steps}"
    assert len(front) >= cfg.candidates and front.bn_recal.notna().all()
    assert front[rungs[0]].notna().all()
    assert front.returned.sum() == 1 and front.test_top1_after.notna().sum() == 1
    won = front[front.returned].iloc[0]
    assert won[rungs].notna().all() and isinstance(won.model, str)
    for a, b in zip(rungs, rungs[1:]):  # survivors of a rung: its best by validation
        entered = front[front[a].notna()]
        kept = entered[entered[b].notna()]
        assert len(kept) == max(1, len(entered) // cfg.eta)
        assert kept[a].min() >= entered[~entered.index.isin(kept.index)][a].max()
    stage = optuna.load_study(study_name="cifar_resnet20-params-0.6:select",
                              storage=f"sqlite:///{out / 'study.db'}")
    assert len(stage.trials) == len(front)
    assert sorted(t.state.name for t in stage.trials) == sorted(
        ["COMPLETE"] + ["PRUNED"] * (len(front) - 1))
    alloc = ah.Allocation.load(out / front.allocation[0])
    assert alloc.meta["fit"]["sequential"] and alloc.meta["calibration"]["n"] == cfg.calib
    assert all(s.fit == "data" for s in alloc.layers.values())


def test_every_pareto_allocation_reapplies_within_budget(run):
    cfg, out, ckpt = run
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1 and (front.params_fraction <= cfg.budget).all()
    model = create_model("cifar_resnet20", checkpoint=ckpt)
    inv = ah.inventory(model, (3, 16, 16))
    for path in front.allocation:
        alloc = ah.Allocation.load(out / path, inventory=inv)
        small = ah.apply(model, alloc)
        assert ah.cost(small, (3, 16, 16)).params <= cfg.budget * inv.total_params


def test_exported_model_reproduces_reported_accuracy(run):
    cfg, out, _ = run
    front = pd.read_csv(out / "pareto.csv")
    best = front.dropna(subset=["model"]).iloc[0]
    model = ah.load(out / best.model)
    data = load_data("digits", model, input_size=(3, 16, 16))
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


def test_speed_cache_follows_the_allocation_not_its_name(run, tmp_path, monkeypatch):
    """``speed.json`` is keyed by the allocation's content: another search in the same folder
    (another budget) writes other layers under the same trial number, and is measured anew."""
    from types import SimpleNamespace

    import autohybrid.search.speed as speed_mod

    cfg, out, ckpt = run
    calls = []
    monkeypatch.setattr(speed_mod, "speed", lambda *a, **k: calls.append(1) or
                        {"latency_ratio_b1": 0.5 + len(calls)})
    (tmp_path / "allocations").mkdir()
    path = "allocations/trial-0000.yaml"
    alloc = ah.Allocation.load(out / pd.read_csv(out / "pareto.csv").allocation[0])
    alloc.save(tmp_path / path)
    model = create_model("cifar_resnet20", checkpoint=ckpt)
    setup = SimpleNamespace(cfg=SearchConfig(out=str(tmp_path)), model=model, size=(3, 16, 16),
                            inv=ah.inventory(model, (3, 16, 16)),
                            ps=SimpleNamespace(latency=None))
    first = speed_mod.measure_speed(setup, [{"allocation": path}])[0]["latency_ratio_b1"]
    again = speed_mod.measure_speed(setup, [{"allocation": path}])[0]["latency_ratio_b1"]
    assert len(calls) == 1 and again == first  # cached
    name, spec = next(iter(alloc.layers.items()))
    alloc.layers = {name: spec}  # other layers, same file name
    alloc.save(tmp_path / path)
    other = speed_mod.measure_speed(setup, [{"allocation": path}])[0]["latency_ratio_b1"]
    assert len(calls) == 2 and other != first


def test_finetune_budget_zero_returns_the_best_candidate_as_fitted(run, tmp_path):
    """``--finetune-budget 0`` (post-training compression): the same candidates, fitted and
    scored on the validation split, and the best of them returned with no fine-tune step."""
    import optuna

    cfg, out, _ = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("select", "models"))
    optuna.delete_study(study_name="cifar_resnet20-params-0.6:select",
                        storage=f"sqlite:///{copy / 'study.db'}")
    d = {**cfg.to_dict(), "out": str(copy), "finetune_steps": None, "finetune_budget": 0}
    run_search(SearchConfig.from_dict(d))
    front = pd.read_csv(copy / "pareto.csv")
    assert [c for c in front if c.startswith("val_top1_step_")] == ["val_top1_step_0"]
    assert len(front) == len(pd.read_csv(out / "pareto.csv"))  # the same pool
    won = front[front.returned].iloc[0]
    assert front.returned.sum() == 1
    assert won.val_top1_step_0 == front.val_top1_step_0.max()
    assert won.test_top1_after == won.test_top1_before  # nothing trained
    assert not (copy / "select").exists()  # no fine-tune checkpoint was written
    model = ah.load(copy / won.model)
    data = load_data("digits", model, input_size=(3, 16, 16))
    assert abs(evaluate(model, data.test, progress=False)["top1"] - won.test_top1_after) <= 0.1
    assert "no fine-tune" in (copy / "report.html").read_text()


# -- the report in a real browser -------------------------------------------------------------
# Appended to a copy of report.html: measures every <svg> once the page has laid out and
# writes the numbers into the DOM, which --dump-dom prints.
PROBE = """<pre id="probe"></pre><script>
const out = [...document.querySelectorAll("svg")].map(s => {
  const r = s.getBoundingClientRect();
  const marks = [...s.querySelectorAll("path, use, rect, image")].filter(e => {
    const b = e.getBoundingClientRect(); return b.width > 0 || b.height > 0; }).length;
  return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height, marks: marks};
});
document.getElementById("probe").textContent = JSON.stringify(
  {svgs: out, width: document.documentElement.scrollWidth,
   height: document.documentElement.scrollHeight});
</script>"""


def _chromium() -> str:
    exe = next((e for e in ("chromium", "chromium-browser", "google-chrome") if shutil.which(e)),
               None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: scripts/test.sh installs it (apt-get)")
        pytest.skip("no chromium on PATH: run scripts/chromium.sh (Debian package `chromium`)")
    return exe


def _browse(exe: str, page: Path, *args: str) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", "--allow-file-access-from-files",
           f"--user-data-dir={page.parent / 'chromium-profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _render(exe: str, page: Path) -> tuple[list[dict], np.ndarray]:
    """Every <svg>'s box and drawn-element count as laid out by Chromium, and a screenshot of
    the whole page (RGB array) at the same width."""
    dom = _browse(exe, page, "--window-size=1200,900", "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the probe did not run: Chromium did not render the page"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    shot = page.with_suffix(".png")
    _browse(exe, page, f"--window-size=1200,{int(probe['height']) + 10}",
            f"--screenshot={shot}")
    return probe["svgs"], np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _ink(pixels: np.ndarray) -> tuple[float, int]:
    """Fraction of non-white pixels, and the number of coloured (not grey) ones."""
    ink = (pixels < 235).any(axis=-1).mean()
    coloured = int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 60).sum())
    return float(ink), coloured


def test_report_draws_in_headless_chromium(run, tmp_path):
    """report.html, offline in a real browser: each of its plots lays out at a readable size
    with its marks drawn, and the pixels inside each plot's box are actually painted."""
    exe = _chromium()
    _, out, _ = run
    html = (out / "report.html").read_text()
    # offline: no scripts, nothing fetched from anywhere (air-gapped clusters)
    assert "<script" not in html and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    svgs, pixels = _render(exe, page)
    assert len(svgs) == html.count("<svg") >= 3
    for i, s in enumerate(svgs):
        assert s["w"] >= 300 and s["h"] >= 200, f"plot {i} collapsed: {s}"
        assert s["marks"] >= 20, f"plot {i} has almost nothing drawn: {s}"
        x, y = int(s["x"]), int(s["y"])
        box = pixels[y:y + int(s["h"]), x:x + int(s["w"])]
        assert box.size, f"plot {i} lies outside the screenshot: {s}"
        ink, coloured = _ink(box)
        assert 0.02 < ink < 0.98 and coloured > 100, f"plot {i} not painted: {ink=} {coloured=}"

    # the same check on the page with its plots removed must fail: it can tell
    empty = tmp_path / "empty.html"
    empty.write_text(re.sub(r"<svg.*?</svg>", "", html, flags=re.S).replace(
        "</body>", PROBE + "</body>"))
    svgs, pixels = _render(exe, empty)
    assert svgs == [] and _ink(pixels)[1] < 100


def test_report_reads_like_a_page_for_a_person(run):
    """No Python dicts, raw field names or unrounded floats in report.html's text; the
    quality axis is linear unless the values span a decade."""
    import re

    _, out, _ = run
    page = (out / "report.html").read_text()
    text = re.sub(r"<svg.*?</svg>", "", page, flags=re.S)
    assert "{'" not in text and "COMPLETE" not in text
    assert "params_fraction" not in text and "test_top1_before" not in text
    assert "Params kept" in text and "trials (" in text
    cells = re.findall(r"<td>([^<]*)</td>", text)
    assert cells and not [c for c in cells if re.fullmatch(r"-?\d+\.\d{5,}", c)], cells


def test_quality_axis_is_log_only_over_a_decade():
    from types import SimpleNamespace

    import optuna

    from autohybrid.search.report import pareto_figure

    for values, scale in (([1.69, 1.70, 1.73], "linear"), ([0.01, 0.5, 2.0], "log")):
        study = optuna.create_study(directions=["minimize", "minimize"])
        for i, v in enumerate(values):
            study.add_trial(optuna.trial.create_trial(
                values=[v, 0.1 + 0.1 * i], user_attrs={"constraint": -0.1}))
        fig = pareto_figure(SimpleNamespace(get_trials=study.get_trials), 0.5, "kl", "params")
        assert fig.axes[0].get_yscale() == scale
