"""Stage 4: every result states its speed.

Each row of ``pareto.csv`` gets its measured latency beside the dense model's, at batch 1
and at the latency batch (64 unless ``--latency-batch`` says otherwise), on ``--runtime`` at
``--threads``: the row's allocation built with random values in its deploy forms (the
fastest the latency table measured, or the sparse parts precomputed without a table), timed
interleaved with the dense model in this process. The returned model is timed again from
its exported files in a fresh process, and under a latency budget the table's prediction is
set against that measurement.

Under a latency budget the selection's candidates are timed before any is fine-tuned
(``within_measured``): the table predicts within a few percent, so a candidate predicted just
under the budget can measure just over it, and what the search returns must measure within.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from autohybrid.allocation import Allocation
from autohybrid.io import atomic_write_text
from autohybrid.latency import (
    REPEATS,
    best_forms,
    measure_export,
    measure_model,
    random_model,
    speed,
)
from autohybrid.progress import bar, console
from autohybrid.search.select import allocation_file

__all__ = ["speed_batches", "measure_speed", "within_measured"]


def speed_batches(cfg) -> list[int]:
    return sorted({1, cfg.latency_batch if cfg.latency_batch > 1 else 64})


def measure_speed(setup, rows: list[dict]) -> list[dict]:
    """``rows`` with their measured speed (columns ``latency_ratio_b{N}``, ``latency_ms_b{N}``,
    ``dense_ms_b{N}``; ``latency_fraction`` predicted under a latency table; for the returned
    model ``fresh_latency_ratio_b{N}`` and, with a table, ``prediction_error``). Kept in
    ``speed.json`` per result and setting: a rerun measures only what is new."""
    cfg, inv, table = setup.cfg, setup.inv, setup.ps.latency
    out = Path(cfg.out)
    threads = cfg.threads or torch.get_num_threads()
    batches = speed_batches(cfg)
    console.rule(f"speed: {len(rows)} result(s), {cfg.runtime}, {threads} thread(s), "
                 f"batch {' and '.join(map(str, batches))}")
    cache_path = out / "speed.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for row in bar(rows, desc="speed of the results"):
        # the file's content, not only its name: another budget's search in the same folder
        # writes other layers under the same trial number
        digest = hashlib.sha256((out / row["allocation"]).read_bytes()).hexdigest()[:16]
        key = json.dumps([row["allocation"], digest, row.get("model"), cfg.runtime, threads,
                          batches, table.key if table is not None else None], sort_keys=True)
        if key in cache:
            row.update(cache[key])
            continue
        before = set(row)
        layers = Allocation.load(out / row["allocation"], inv).layers
        forms = best_forms(table, inv, layers) if table is not None else {}
        if table is not None:  # what the budget counted (margin added), and the prediction
            row["latency_fraction"] = round(table.fraction(inv, layers), 4)
            row["latency_predicted"] = round(table.predicted_fraction(inv, layers), 4)
        model = random_model(setup.model, inv, layers, forms)
        row.update(speed(model, setup.model, setup.size, batches, cfg.runtime, threads),
                   runtime=cfg.runtime, threads=threads)
        if row.get("model"):
            fresh = measure_export(out / row["model"], batches, cfg.runtime, threads)
            row.update({f"fresh_{k}": v for k, v in fresh.items()
                        if k.startswith("latency_ratio")})
            if table is not None:
                measured = fresh[f"latency_ratio_b{table.key['batch']}"]
                row["prediction_error"] = round(row["latency_predicted"] / measured - 1, 4)
                if measured > cfg.budget:
                    console.print(f"[yellow]warning[/]: the returned model measures "
                                  f"{measured:.3f} of the dense latency, over the budget "
                                  f"{cfg.budget:g} (predicted {row['latency_predicted']:.3f});"
                                  " raise --latency-margin to keep it", highlight=False)
        cache[key] = {k: v for k, v in row.items() if k not in before}
        atomic_write_text(cache_path, json.dumps(cache, indent=1))
    return rows


def within_measured(setup, pool: list) -> list:
    """The candidates of ``pool`` whose model (random values, the table's fastest forms)
    measures at or under the latency budget at the table's batch, timed interleaved with the
    dense model; kept in ``candidates-latency.json``, so a resumed selection sees the same
    pool. When none measures within, the fastest is kept, with a warning."""
    cfg, inv, table = setup.cfg, setup.inv, setup.ps.latency
    out = Path(cfg.out)
    threads = table.key["threads"]
    batch = table.key["batch"]
    cache_path = out / "candidates-latency.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    measured = {}
    for t in bar(pool, desc="latency of the candidates"):
        path = out / allocation_file(t.number)
        key = json.dumps([path.name, path.read_text(), table.key], sort_keys=True)
        if key not in cache:
            layers = Allocation.load(path, inv).layers
            model = random_model(setup.model, inv, layers, best_forms(table, inv, layers))
            cache[key] = measure_model(model, setup.model, setup.size, batch, cfg.runtime,
                                       threads, repeats=REPEATS)["ratio"]
            atomic_write_text(cache_path, json.dumps(cache, indent=1))
        measured[t.number] = cache[key]
    kept = [t for t in pool if measured[t.number] <= cfg.budget]
    over = {t.number: round(measured[t.number], 3) for t in pool if t not in kept}
    if over:
        console.print(f"{len(over)} candidate(s) measure over the latency budget "
                      f"{cfg.budget:g} and leave the pool (trial: measured) {over}",
                      highlight=False)
    if not kept:
        fastest = min(pool, key=lambda t: measured[t.number])
        console.print(f"[yellow]warning[/]: no candidate measures within the latency budget "
                      f"{cfg.budget:g}; keeping the fastest, trial {fastest.number} "
                      f"({measured[fastest.number]:.3f}): raise --latency-margin to keep "
                      "it", highlight=False)
        kept = [fastest]
    return kept
