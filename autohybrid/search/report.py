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

__all__ = ["write_search_report", "pareto_figure", "allocation_figure", "halving_figure"]


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


WINNER = "#d62728"


def halving_figure(df: pd.DataFrame):
    """The halving ladder: validation top-1 vs fine-tune steps, a line per candidate, ending
    at the rung it was pruned at; the one returned drawn bold. The axis spans the candidates
    that reached a second rung (and those within 10 points of the best at rung 0); the rest
    sit on its lower edge as downward triangles, their values in the legend."""
    steps = sorted(int(c.rsplit("_", 1)[1]) for c in df if c.startswith("val_top1_step_"))
    col = [f"val_top1_step_{s}" for s in steps]
    first = df[col[0]].dropna()
    later = df[df[col[1]].notna()][col].stack() if len(col) > 1 else first.iloc[:0]
    focus = pd.concat([later, first[first >= first.max() - 10]])
    lo = float(focus.min()) - 1.0 if len(focus) else 0.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c != WINNER]
    for i, (_, r) in enumerate(df.iterrows()):
        pts = [(s, r[c]) for s, c in zip(steps, col) if r[c] == r[c]]  # not NaN
        if not pts:
            continue
        won = bool(r.get("returned"))
        below = [v for _, v in pts if v < lo]
        label = f"trial {int(r['trial'])} ({r.get('family', '')})" + (": returned" if won else "")
        if below:
            label += f", {min(below):.1f} % (below the axis)"
        ys = [max(v, lo) for _, v in pts]
        line, = ax.plot([p[0] for p in pts], ys, "-", lw=2.5 if won else 1,
                        c=WINNER if won else others[i % len(others)], alpha=1 if won else 0.7,
                        zorder=3 if won else 2, label=label)
        for (x, v), y in zip(pts, ys):
            ax.plot(x, y, "v" if v < lo else "o", c=line.get_color(), clip_on=False,
                    zorder=line.get_zorder())
    if len(steps) > 2 and steps[-1] > 10 * steps[1]:
        ax.set_xscale("symlog", linthresh=steps[1])
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(bottom=lo)
    ax.set_xlabel("fine-tune steps")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Selection: successive halving over fine-tune steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(trials, cfg) -> str:
    """One sentence: what was searched and what became of the trials."""
    n = {s: sum(t.state == s for t in trials) for s in TrialState}
    over = sum(bool(t.user_attrs.get("infeasible")) for t in trials)
    screened = sum(bool(t.user_attrs.get("screened")) for t in trials)
    evaluated = sum(t.state == TrialState.COMPLETE and not t.user_attrs.get("infeasible")
                    for t in trials)
    parts = [f"{evaluated} evaluated"]
    parts += [f"{k} {v}" for k, v in (("over the budget (not evaluated: quality predicted by "
                                       "the surrogate)", over),
                                      ("screened out by the surrogate", screened),
                                      ("failed", n[TrialState.FAIL]),
                                      ("still running", n[TrialState.RUNNING])) if v]
    return (f"Model {cfg.model}, budget {cfg.budget:g} of the dense model's {cfg.metric}: "
            f"{len(trials)} trials ({', '.join(parts)}); sampler {cfg.sampler}, trials "
            f"scored by {QUALITY_NAMES.get(cfg.quality, cfg.quality)} on the calibration "
            "images.")


def _speed_summary(df: pd.DataFrame) -> str:
    """Where the latency columns come from, and the returned model's measured speed."""
    if "latency_ratio_b1" not in df:
        return ""
    r0 = df.iloc[0]
    batches = sorted(int(c.rsplit("b", 1)[1]) for c in df if c.startswith("latency_ratio_b"))
    text = (f"Latency measured on {r0.runtime} at {int(r0.threads)} thread(s), batch "
            f"{' and '.join(map(str, batches))}: each result built in its deploy forms and "
            "timed interleaved with the dense model (median of per-round ratios); MACs count "
            "sparse parts by their nonzeros, what a sparse kernel would run, which a CPU "
            "runs only as fast as the measured latency says.")
    won = df[df.returned.astype(bool)] if "returned" in df else df.iloc[:0]
    if len(won) and "fresh_latency_ratio_b1" in df:
        r = won.iloc[0]
        fresh = ", ".join(f"batch {b} {r[f'fresh_latency_ratio_b{b}']:.1%}" for b in batches
                          if f"fresh_latency_ratio_b{b}" in df)
        text += f" The returned model, from its exported files in a fresh process: {fresh}"
        if "prediction_error" in df and r.prediction_error == r.prediction_error:
            pred = r.latency_predicted if "latency_predicted" in df else r.latency_fraction
            text += (f" of the dense latency (predicted {pred:.1%}, error "
                     f"{r.prediction_error:+.1%})")
        text += "."
    return text


def _selection_summary(df: pd.DataFrame, lad) -> str:
    won = df[df.returned.astype(bool)] if "returned" in df else df.iloc[:0]
    if lad.full == 0:
        text = (f"{len(df)} candidates fitted and ranked by validation top-1 with no "
                "fine-tune (--finetune-budget 0).")
    else:
        text = (f"{len(df)} candidates fine-tuned by successive halving (eta {lad.eta}): "
                f"rungs at {', '.join(map(str, lad.steps))} fine-tune steps, {lad.cost} steps "
                "in all, each rung keeping the best by validation top-1.")
    if len(won):
        r = won.iloc[0]
        text += (f" Returned: trial {int(r.trial)}, validation top-1 "
                 f"{r[f'val_top1_step_{lad.full}']:.2f} % after {lad.full} steps, test top-1 "
                 f"{r.test_top1_after:.2f} % (before fine-tuning {r.test_top1_before:.2f} %).")
    return text


QUALITY_NAMES = {"kl": "KL divergence to the dense model", "loss": "cross-entropy loss",
                 "disagreement": "disagreement with the dense model"}
FRONT_COLUMNS = {  # pareto.csv column -> (heading, format)
    "trial": ("Trial", "{:.0f}"), "params_fraction": ("Params kept", "{:.1%}"),
    "macs_fraction": ("MACs kept (sparse parts by nonzeros)", "{:.1%}"),
    "latency_fraction": ("Latency kept, predicted + margin (the budget's count)", "{:.1%}"),
    "latency_predicted": ("Latency kept, predicted", "{:.1%}"),
    "latency_ratio_b1": ("Latency kept, batch 1 (measured)", "{:.1%}"),
    "latency_ratio_b64": ("Latency kept, batch 64 (measured)", "{:.1%}"),
    "latency_ms_b1": ("Latency batch 1 (ms)", "{:.2f}"),
    "fresh_latency_ratio_b1": ("Latency kept, batch 1, fresh process", "{:.1%}"),
    "prediction_error": ("Latency prediction error", "{:+.1%}"),
    "family": ("Methods", "{}"),
    "top1_calibration": ("Top-1 calibration (%)", "{:.2f}"),
    "test_top1_before": ("Top-1 test, before fine-tune (%)", "{:.2f}"),
    "returned": ("Returned", "{}"),
    "test_top1_after": ("Top-1 test, after fine-tune (%)", "{:.2f}"),
    "bn_recal": ("BN recalibrated", "{}"), "origin": ("From", "{}"),
    "allocation": ("Allocation file", "{}"), "model": ("Exported model", "{}"),
}


def front_table(df: pd.DataFrame, quality: str) -> str:
    """The candidates as a table for people: headings in words, fractions as percentages,
    accuracies to two decimals, the validation top-1 at every rung of the halving."""
    cols = dict(FRONT_COLUMNS)
    rungs = {c: (f"Top-1 validation after {c.rsplit('_', 1)[1]} steps (%)", "{:.2f}")
             for c in df if c.startswith("val_top1_step_")}
    cols = {"trial": cols.pop("trial"), quality: (
        f"{quality.upper() if quality == 'kl' else quality.capitalize()} (calibration)",
        "{:.4f}"), **rungs, **cols}
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


def write_search_report(study, out: str | Path, cfg, table, inv, lad=None) -> Path:
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
    if pareto_csv.is_file() and pareto_csv.stat().st_size > 1:
        df = pd.read_csv(pareto_csv)
        if lad is not None:
            sections.append(("Selection", f"<p>{html.escape(_selection_summary(df, lad))}</p>"))
        if _speed_summary(df):
            sections.append(("Speed", f"<p>{html.escape(_speed_summary(df))}</p>"))
        sections.append(("Candidates", front_table(df, cfg.quality)))
        if any(c.startswith("val_top1_step_") for c in df):
            figs = {"halving.png": halving_figure(df), **figs}
    titles = {"pareto.png": "Quality vs cost", "allocation.png": "Best allocation per layer",
              "sensitivity_heatmap.png": "Sensitivity", "halving.png": "Halving ladder"}
    for name, fig in figs.items():
        save_figure(fig, out / name)
        sections.append((titles[name], svg(fig)))
        plt.close(fig)
    page = html_page(f"autohybrid search: {cfg.model} at {cfg.budget:g} {cfg.metric}", sections)
    return atomic_write_text(out / "report.html", page)
