"""report.html for a search: Pareto front, per-layer allocation of the best trials, sensitivity.

Inline SVG only (no scripts, no CDN), so the page opens on air-gapped clusters.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from optuna.trial import TrialState

from autohybrid.io import atomic_write_text
from autohybrid.report import html_page, save_figure, sensitivity_heatmap, svg
from autohybrid.search.study import pareto_front, trial_layers, within_budget

__all__ = ["write_search_report", "pareto_figure", "allocation_figure"]


def pareto_figure(study, budget: float, quality: str, metric: str):
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    feas = [t for t in trials if within_budget(t)]
    ax.scatter([t.values[1] for t in feas], [t.values[0] for t in feas], s=14, c="#bbbbbb",
               label="trials")
    for t in feas:
        if t.user_attrs.get("warm_start"):
            ax.scatter(t.values[1], t.values[0], marker="s", s=50, facecolors="none",
                       edgecolors="k")
            ax.annotate(t.user_attrs["warm_start"], (t.values[1], t.values[0]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    front = sorted(pareto_front(trials, budget), key=lambda t: t.values[1])
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="#d62728",
            label="Pareto front")
    ax.axvline(budget, ls="--", c="k", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel(f"{metric} fraction of the dense model")
    ax.set_ylabel(f"{quality} on calibration (lower is better)")
    if quality == "kl" and feas and min(t.values[0] for t in feas) > 0:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Search: quality vs cost (squares: warm starts)")
    fig.tight_layout()
    return fig


def allocation_figure(trial, inv):
    """Per layer: kept fraction of its weights, coloured by method."""
    layers = trial_layers(trial)
    names = [la.name for la in inv.compressible] or [la.name for la in inv]
    kept, colors = [], []
    from autohybrid.methods import METHODS

    for n in names:
        spec = layers.get(n)
        layer = inv[n]
        if spec is None:
            kept.append(1.0)
            colors.append(METHODS["dense"].color)
        else:
            p = METHODS[spec.method].params(layer, spec)
            kept.append(p / layer.params)
            colors.append(METHODS[spec.method].color if spec.method in METHODS else "#000")
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.8))
    ax.bar(range(len(names)), kept, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("params kept")
    handles = [plt.Rectangle((0, 0), 1, 1, color=m.color) for m in METHODS.values()]
    ax.legend(handles, list(METHODS), fontsize=7, ncol=4)
    ax.set_title(f"Allocation of trial {trial.number}")
    fig.tight_layout()
    return fig


def write_search_report(study, out: str | Path, cfg, table, inv) -> Path:
    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    front = pareto_front(trials, cfg.budget)
    figs = {"pareto.png": pareto_figure(study, cfg.budget, cfg.quality, cfg.metric)}
    if front:
        figs["allocation.png"] = allocation_figure(front[0], inv)
    figs["sensitivity_heatmap.png"] = sensitivity_heatmap(table.df, "kl")
    sections = []
    states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
    summary = (
        f"<p>model <b>{html.escape(str(cfg.model))}</b>, budget {cfg.budget:g} of "
        f"{cfg.metric}, {len(trials)} trials ({html.escape(str(states))}), sampler "
        f"{cfg.sampler}, quality signal {cfg.quality}.</p>"
    )
    sections.append(("Summary", summary))
    pareto_csv = out / "pareto.csv"
    if pareto_csv.is_file():
        sections.append(("Pareto front", pd.read_csv(pareto_csv).to_html(
            index=False, float_format=lambda v: f"{v:.4g}", na_rep="")))
    titles = {"pareto.png": "Quality vs cost", "allocation.png": "Best allocation per layer",
              "sensitivity_heatmap.png": "Sensitivity"}
    for name, fig in figs.items():
        save_figure(fig, out / name)
        sections.append((titles[name], svg(fig)))
        plt.close(fig)
    page = html_page(f"autohybrid search: {cfg.model} at {cfg.budget:g} {cfg.metric}", sections)
    return atomic_write_text(out / "report.html", page)
