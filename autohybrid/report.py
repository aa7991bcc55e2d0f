"""Plots and self-contained HTML reports (inline SVG: they open offline, on air-gapped hosts)."""

from __future__ import annotations

import html
import io
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # files only, even where $DISPLAY is set; Jupyter keeps
    matplotlib.use("Agg")          # its inline backend so the figures show in notebooks
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from autohybrid.io import atomic_path, atomic_write_text  # noqa: E402

__all__ = [
    "sensitivity_heatmap", "sensitivity_curves", "write_sensitivity_report", "save_figure",
    "html_page", "svg",
]

def candidate_label(row) -> str:
    """A sensitivity table row's candidate in a few words (its method's ``label``)."""
    from autohybrid.methods import label
    from autohybrid.sensitivity import spec_from_row

    return label(spec_from_row(row))


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-width + 1 :]


def sensitivity_heatmap(df: pd.DataFrame, signal: str = "kl"):
    """Layers x candidates, coloured by ``signal`` (log scale where it spans decades)."""
    df = df.assign(candidate=[candidate_label(r) for _, r in df.iterrows()])
    df = df.assign(_slot=df.groupby("layer").cumcount())
    layers = list(dict.fromkeys(df.layer))
    slots = int(df._slot.max()) + 1
    grid = np.full((len(layers), slots), np.nan)
    labels = [[""] * slots for _ in layers]
    for _, r in df.iterrows():
        i = layers.index(r.layer)
        grid[i, r._slot] = r[signal]
        labels[i][r._slot] = r.candidate
    fig, ax = plt.subplots(figsize=(2 + 0.75 * slots, 1.2 + 0.28 * len(layers)))
    values = np.clip(grid, 1e-6, None) if signal == "kl" else grid
    norm = matplotlib.colors.LogNorm() if signal == "kl" else None
    im = ax.imshow(values, aspect="auto", cmap="magma_r", norm=norm)
    ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=7)
    ax.set_xticks(range(slots), [f"#{j}" for j in range(slots)], fontsize=7)
    ax.set_xlabel("candidate (see table; same order per layer: sparse, low-rank, L+S)")
    fig.colorbar(im, ax=ax, label=signal)
    ax.set_title(f"Sensitivity per layer and candidate ({signal})")
    fig.tight_layout()
    return fig


def sensitivity_curves(df: pd.DataFrame, signal: str = "kl", max_layers: int = 12):
    from autohybrid.methods import color

    """Per layer: ``signal`` against the fraction of the layer's parameters kept, per method."""
    layers = list(dict.fromkeys(df.layer))
    if len(layers) > max_layers:  # the most sensitive ones, so the plot stays readable
        worst = df.groupby("layer")[signal].max().sort_values(ascending=False)
        layers = [n for n in layers if n in set(worst.index[:max_layers])]
    cols = min(4, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, layers):
        d = df[df.layer == name]
        kept = d.params / (d.params + d.params_saved)
        for method, g in d.assign(kept=kept).groupby("method"):
            g = g.sort_values("kept")
            ax.plot(g.kept, g[signal], "o-", ms=3, label=method, color=color(method))
        ax.set_title(_short(name, 34), fontsize=8)
        ax.set_xlabel("params kept", fontsize=7)
        ax.set_ylabel(signal, fontsize=7)
        if signal == "kl":
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"Sensitivity curves ({signal})")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    return Path(path)


def svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A standalone page: no scripts, no external files."""
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{content}</section>"
                     for h, content in sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
svg{{max-width:100%;height:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def write_sensitivity_report(table, out_dir: str | Path, signal: str = "kl") -> list[Path]:
    """sensitivity_heatmap.png, sensitivity_curves.png and sensitivity.html in ``out_dir``."""
    out_dir = Path(out_dir)
    df = table.df
    heat, curves = sensitivity_heatmap(df, signal), sensitivity_curves(df, signal)
    paths = [save_figure(heat, out_dir / "sensitivity_heatmap.png"),
             save_figure(curves, out_dir / "sensitivity_curves.png")]
    shown = df.assign(candidate=[candidate_label(r) for _, r in df.iterrows()])[
        ["layer", "candidate", "params", "rel_error", "dloss", "dtop1", "kl", "agreement"]
    ]
    dense = table.meta.get("dense", {})
    summary = (
        f"<p>model {html.escape(str(table.meta.get('model')))}, {table.meta.get('n')} "
        f"calibration images, dense loss {dense.get('loss', float('nan')):.4f}, top-1 "
        f"{dense.get('top1', float('nan')):.2f} %, BN recalibration "
        f"{'on' if table.meta.get('bn_recal') else 'off'}.</p>"
    )
    page = html_page(
        "autohybrid sensitivity",
        [("Summary", summary), ("Heatmap", svg(heat)), ("Curves", svg(curves)),
         ("Table", shown.to_html(index=False, float_format=lambda v: f"{v:.4g}"))],
    )
    plt.close(heat)
    plt.close(curves)
    paths.append(atomic_write_text(out_dir / "sensitivity.html", page))
    return paths
