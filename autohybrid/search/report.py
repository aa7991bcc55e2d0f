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
    values = [t.values[0] for t in feas]
    if quality == "kl" and values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # only where the values span a decade: else plain ticks read best
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


def _summary(trials, cfg) -> str:
    """One sentence: what was searched and what became of the trials."""
    n = {s: sum(t.state == s for t in trials) for s in TrialState}
    over = sum(bool(t.user_attrs.get("infeasible")) for t in trials)
    screened = sum(bool(t.user_attrs.get("screened")) for t in trials)
    parts = [f"{n[TrialState.COMPLETE]} evaluated"]
    parts += [f"{k} {v}" for k, v in (("over the budget (not evaluated)", over),
                                      ("screened out by the surrogate", screened),
                                      ("failed", n[TrialState.FAIL]),
                                      ("still running", n[TrialState.RUNNING])) if v]
    return (f"Model {cfg.model}, budget {cfg.budget:g} of the dense model's {cfg.metric}: "
            f"{len(trials)} trials ({', '.join(parts)}); sampler {cfg.sampler}, trials "
            f"scored by {QUALITY_NAMES.get(cfg.quality, cfg.quality)} on the calibration "
            "images.")


QUALITY_NAMES = {"kl": "KL divergence to the dense model", "loss": "cross-entropy loss",
                 "disagreement": "disagreement with the dense model"}
FRONT_COLUMNS = {  # pareto.csv column -> (heading, format)
    "trial": ("Trial", "{:.0f}"), "params_fraction": ("Params kept", "{:.1%}"),
    "macs_fraction": ("MACs kept", "{:.1%}"), "top1_calibration_fitted":
    ("Top-1 calibration (%)", "{:.2f}"), "test_top1_before": ("Top-1 test, before "
    "fine-tune (%)", "{:.2f}"), "test_top1_after": ("Top-1 test, after fine-tune (%)",
    "{:.2f}"), "bn_recal": ("BN recalibrated", "{}"), "origin": ("From", "{}"),
    "allocation": ("Allocation file", "{}"), "model": ("Exported model", "{}"),
}


def front_table(df: pd.DataFrame, quality: str) -> str:
    """The front as a table for people: headings in words, fractions as percentages,
    accuracies to two decimals; the quality score after the refit, in its own words."""
    cols = dict(FRONT_COLUMNS)
    fitted = f"{quality}_fitted" if f"{quality}_fitted" in df else quality
    cols = {"trial": cols.pop("trial"), fitted: (
        f"{quality.upper() if quality == 'kl' else quality.capitalize()} (calibration)",
        "{:.4f}"), **cols}
    shown = [c for c in cols if c in df]

    def cell(v, fmt: str) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        try:
            return html.escape(fmt.format(v))
        except (ValueError, TypeError):
            return html.escape(str(v))

    head = "".join(f"<th>{html.escape(cols[c][0])}</th>" for c in shown)
    rows = "".join("<tr>" + "".join(f"<td>{cell(r[c], cols[c][1])}</td>" for c in shown)
                   + "</tr>" for _, r in df.iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_search_report(study, out: str | Path, cfg, table, inv) -> Path:
    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    front = pareto_front(trials, cfg.budget)
    figs = {"pareto.png": pareto_figure(study, cfg.budget, cfg.quality, cfg.metric)}
    if front:
        figs["allocation.png"] = allocation_figure(front[0], inv)
    figs["sensitivity_heatmap.png"] = sensitivity_heatmap(table.df, "kl")
    sections = []
    sections.append(("Summary", f"<p>{html.escape(_summary(trials, cfg))}</p>"))
    pareto_csv = out / "pareto.csv"
    if pareto_csv.is_file():
        sections.append(("Pareto front", front_table(pd.read_csv(pareto_csv), cfg.quality)))
    titles = {"pareto.png": "Quality vs cost", "allocation.png": "Best allocation per layer",
              "sensitivity_heatmap.png": "Sensitivity"}
    for name, fig in figs.items():
        save_figure(fig, out / name)
        sections.append((titles[name], svg(fig)))
        plt.close(fig)
    page = html_page(f"autohybrid search: {cfg.model} at {cfg.budget:g} {cfg.metric}", sections)
    return atomic_write_text(out / "report.html", page)
