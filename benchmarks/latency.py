"""Latency as a budget on the shared CIFAR-10 checkpoints: what the per-layer table says each
method can buy on this CPU, and whether the table predicts a whole model's measured time.

For each model and batch size (1 and 64, one thread, torch eager on CPU):

(a) the latency table (``autohybrid.latency.measure_table``, the search's keep levels and
    shares, the model's own search space), cached under ``benchmarks/results/latency``;
(b) per method family (sparse only, low-rank only, low-rank + sparse only, any), the smallest
    latency fraction of the dense model the table says the family can reach (every layer at
    its fastest spec of that family), and how many layers have a spec of the family faster
    than the dense layer at all;
(c) at latency budgets 0.7 and 0.5 where reachable: the uniform low-rank allocation (one keep
    level for every layer, binary-searched on the table's prediction), its weight fit
    exported in the forms the table timed fastest, and that export timed in a fresh process
    interleaved with the dense model; predicted against measured.

The accuracy columns of the issue (the standard fine-tune, the search against low-rank
only, uniform and Torch-Pruning at equal measured latency) are not in this script.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency.py --batches 1   # one section
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency.py --batches 64  # per batch list
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # first: records the caller's thread settings
import torch

import autohybrid as ah
from autohybrid.allocation import search_level
from autohybrid.exceptions import BudgetError
from autohybrid.inventory import inventory
from autohybrid.latency import best_forms, measure_export, measure_table
from autohybrid.methods import HYBRID, METHODS, spec_at
from autohybrid.models import create_model
from autohybrid.search_space import load_search_space

CKPT = _common.SHARED / "models" / "cifar10"
MODELS = {
    "cifar_resnet56": CKPT / "resnet56-4bfd9763.th",
    "mobilenetv3_small_100": CKPT / "mobilenetv3_small_100-cifar10.pth",
    "tf_efficientnet_lite0": CKPT / "efficientnet_lite0-cifar10.pth",
    "vit_tiny_patch16_224": CKPT / "vit_tiny_p8_d6-cifar10.pth",
}
SIZES = {"tf_efficientnet_lite0": (3, 64, 64)}
BUDGETS = (0.7, 0.5)
RES = _common.BENCH_DIR / "results" / "latency"
OUT = _common.BENCH_DIR / "out" / "latency"
RESULTS = _common.BENCH_DIR / "RESULTS_latency.md"


def log(msg: str) -> None:
    print(msg, flush=True)


def family_of(spec) -> str:
    if spec.method == HYBRID:
        return "lowrank+sparse"
    return "lowrank" if METHODS[spec.method].lowrank else spec.method


def reachable(table, inv) -> dict[str, tuple[float, int]]:
    """Family -> (smallest predicted fraction, layers with a spec faster than dense)."""
    best: dict[str, dict[str, tuple[float, object]]] = {}
    for name, rows in table.rows.items():
        for key in rows:
            spec = ah.LayerSpec.from_dict(json.loads(key))
            r = table.ratio(inv.by_name[name], spec)
            for fam in (family_of(spec), "any"):
                old = best.setdefault(fam, {}).get(name)
                if old is None or r < old[0]:
                    best[fam][name] = (r, spec)
    out = {}
    for fam, per in best.items():
        layers = {n: s for n, (r, s) in per.items() if r < 1.0}
        out[fam] = (table.fraction(inv, layers), len(layers), len(per))
    return out


def uniform_lowrank(table, inv, space, budget):
    def build(layer, x):
        f = space.factorizations.get(layer.kind)
        lr = f if f and METHODS[f].applies_to(layer) else None
        return spec_at(layer, lr, x) if lr else ah.LayerSpec()

    layers = space.compressible(inv)
    specs, level = search_level(inv, build, budget, "latency", layers=layers, latency=table)
    return {n: s for n, s in specs.items() if s.method != "dense"}, level


def run_model(name: str, batches, rows_b, rows_c) -> None:
    model = create_model(name, checkpoint=MODELS[name]).eval()
    size = SIZES.get(name, (3, 32, 32))
    inv = inventory(model, size)
    space = load_search_space(name).for_latency()  # what --metric latency searches
    for batch in batches:
        t0 = time.time()
        table = measure_table(model, inv, space, threads=1, batch=batch, folder=RES / name)
        fams = reachable(table, inv)
        log(f"{name} batch {batch}: table in {time.time() - t0:.0f} s "
                    f"(measured {table.seconds:.0f} s), dense {1e3 * table.model_s:.2f} ms")
        cells = [f"{fams[f][0]:.3f} ({fams[f][1]}/{fams[f][2]})" if f in fams else "–"
                 for f in ("sparse", "block-sparse", "lowrank", "lowrank+sparse", "any")]
        rows_b.append([name, batch, f"{1e3 * table.model_s:.2f}", f"{table.alpha:.2f}",
                       f"{1e3 * sum(table.dense_s.values()):.2f}", *cells])
        for budget in BUDGETS:
            table = measure_table(model, inv, space, threads=1, batch=batch,
                                  folder=RES / name, probe=budget)  # alpha at the budget
            try:
                layers, level = uniform_lowrank(table, inv, space, budget)
            except BudgetError:
                rows_c.append([name, batch, budget, f"{table.alpha:.2f}", "unreachable", "",
                               "", "", ""])
                continue
            forms = best_forms(table, inv, layers)
            alloc = ah.Allocation.for_inventory(inv, layers)
            alloc.meta["deploy"] = {"runtime": "torch", "threads": 1, "batch": batch,
                                    "forms": forms}
            small = ah.apply(model, alloc, inv)
            path = OUT / name / f"b{batch}-{budget:g}"
            ah.export(small, alloc, path)
            fresh = measure_export(path, [batch], "torch", 1)
            pred = table.fraction(inv, layers)
            meas = fresh[f"latency_ratio_b{batch}"]
            c = alloc.cost(inv)
            rows_c.append([name, batch, budget, f"{table.alpha:.2f}", f"{level:.3f}",
                           f"{c.params_fraction:.3f}",
                           f"{pred:.3f}", f"{meas:.3f}", f"{pred / meas - 1:+.1%}"])
            log(f"  budget {budget}: predicted {pred:.3f}, measured {meas:.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    load0 = _common.load_average()
    rows_b, rows_c = [], []
    for name in args.models:  # the section is rewritten after every model
        run_model(name, args.batches, rows_b, rows_c)
        write(args, rows_b, rows_c, t0, load0)


def write(args, rows_b, rows_c, t0, load0) -> None:
    body = [
        "Per-layer latency tables (torch eager, CPU, one thread; each spec timed interleaved "
        "with its dense layer, median of 9 per-round ratios) and what they say each method "
        "family can buy. Reachable: the smallest fraction of the dense model's latency the "
        "table predicts when every layer takes its fastest spec of the family (in brackets: "
        "layers with a spec of the family faster than the dense layer / layers with one).",
        "",
        _common.table(["model", "batch", "dense ms", "alpha", "sum of layers ms", "sparse",
                       "block-sparse", "low-rank", "L+S", "any"], rows_b),
        "",
        "Uniform low-rank at a latency budget (one keep level, binary-searched on the "
        "prediction, calibrated in the model by alpha probed at the budget), weight fit, "
        "exported in the "
        "forms the table timed fastest, timed from its files in a fresh process interleaved "
        "with the dense model:",
        "",
        _common.table(["model", "batch", "budget", "alpha", "level", "params", "predicted",
                       "measured", "error"], rows_c),
        "",
        _common.provenance(time.time() - t0, (load0, _common.load_average())),
    ]
    title = f"Latency tables and predictions, batch {' and '.join(map(str, args.batches))}"
    _common.write_section(title, "\n".join(body), RESULTS)


if __name__ == "__main__":
    main()
