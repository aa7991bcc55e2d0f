"""Engine speed: how long ``ah.apply`` takes to decompose a model, and what compression does
to CPU inference latency.

(a) Wall time of ``ah.apply`` (every compressible layer) with a uniform ``lowrank+sparse``
    allocation at budgets 0.5 and 0.2 of params, split per method / factorization / layer
    kind, once with the default threads (torch: nproc, numpy's OpenBLAS: its default) and once
    with everything on one thread (on a loaded machine spinning worker threads can make the
    decompositions many times slower). ``lowrank`` and ``sparse`` models, built for (b), are
    built on one thread (their apply times are recorded too).
(b) CPU latency of the dense model and of uniform ``lowrank+sparse``, ``lowrank`` and
    ``sparse`` models at the same budgets, batch 1 and 32, ``torch.set_num_threads(2)``,
    ``torch.inference_mode()``. Variants are timed in interleaved rounds (one forward each per
    round, in rotating order) after a warmup. Two ratios to dense: the median of the
    per-round ratios (drift on a shared machine hits both sides alike) and min / min (the
    least disturbed run of each, as ``timeit`` advises).

Models: ``efficientnet_b0`` (timm, random init, 1000 classes, 224), ``vit_small_patch16_224``
(random init, 224) and ``cifar_resnet56`` (the real checkpoint, 32). A budget a model cannot
reach (efficientnet_b0's dense 1000-class classifier alone is 24 % of its params) is raised
in steps of 0.05 until every method reaches it, and the table says so.

A sparse branch stores only nonzeros but executes densely on CPU (scatter into a dense weight,
then the dense conv / matmul), so ``sparse`` and ``lowrank+sparse`` cost at least a dense
layer's time; their MACs column counts nonzeros, what a sparse kernel would run.

    .venv/bin/python benchmarks/engine_speed.py            # full run, writes RESULTS_engine.md
    .venv/bin/python benchmarks/engine_speed.py --quick    # smoke run, prints only
    # one part at a time (each writes only its own section), e.g. on a loaded machine:
    .venv/bin/python benchmarks/engine_speed.py --parts apply
    .venv/bin/python benchmarks/engine_speed.py --parts latency --threads 1
    .venv/bin/python benchmarks/engine_speed.py --parts latency --threads 2 --batches 1

On a machine shared with other jobs, multi-threaded timings are disturbed far beyond the
load's share (OpenMP barriers wait on descheduled threads); the latency section says so when
the load average exceeded the core count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import _common  # first: records the caller's thread settings
import torch
from threadpoolctl import threadpool_limits
from torch import nn

import autohybrid as ah
from autohybrid.methods import METHODS
from autohybrid.models import create_model

MODELS = {
    "efficientnet_b0": {"kwargs": {"num_classes": 1000}, "input_size": (3, 224, 224)},
    "vit_small_patch16_224": {"kwargs": {}, "input_size": (3, 224, 224)},
    "cifar_resnet56": {
        "checkpoint": "models/cifar10/resnet56-4bfd9763.th",
        "input_size": (3, 32, 32),
    },
}
BUDGETS = (0.5, 0.2)
VARIANTS = ("lowrank+sparse", "lowrank", "sparse")
SECTION_APPLY = "Decomposition time of ah.apply"
SECTION_LATENCY = "CPU inference latency, dense vs compressed"


@contextmanager
def timed_compress(totals: dict[str, list[float]]):
    """Time every ``Method.compress`` call that ``ah.apply`` makes, keyed by what it did.

    Shadows ``compress`` on the registered method objects for the duration (benchmark-only
    instrumentation; the library is not modified).
    """

    def wrap(method):
        original = method.compress

        def compress(weight, bias, layer, spec, *args, **kwargs):
            t = time.perf_counter()
            out = original(weight, bias, layer, spec, *args, **kwargs)
            key = spec.method + (f"/{spec.factorization}" if spec.factorization else "")
            entry = totals[f"{key} ({layer.kind})"]
            entry[0] += time.perf_counter() - t
            entry[1] += 1
            return out

        return compress

    for m in METHODS.values():
        m.compress = wrap(m)
    try:
        yield
    finally:
        for m in METHODS.values():
            del m.compress


def build_model(name: str) -> tuple[nn.Module, ah.Inventory]:
    cfg = MODELS[name]
    if "checkpoint" in cfg:
        model = create_model(name, checkpoint=_common.SHARED / cfg["checkpoint"])
    else:
        model = create_model(name, **cfg["kwargs"])
    model.eval()
    return model, ah.inventory(model, input_size=cfg["input_size"])


def reachable_budget(inv: ah.Inventory, budget: float) -> float:
    """``budget``, or the first budget in steps of 0.05 above it that every variant reaches."""
    b = budget
    while True:
        try:
            for method in VARIANTS:
                ah.Allocation.uniform(inv, method=method, budget=b, metric="params")
            return b
        except ah.AutohybridError:
            b = round(b + 0.05, 2)
            if b > 1:
                raise


def timed_apply(model, inv, method, budget, one_thread=False):
    """(compressed model, allocation, search seconds, apply seconds, per-key totals)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    threads = torch.get_num_threads()
    limit = threadpool_limits(1) if one_thread else None  # numpy's OpenBLAS and OpenMP
    if one_thread:
        torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        alloc = ah.Allocation.uniform(inv, method=method, budget=budget, metric="params")
        t1 = time.perf_counter()
        with timed_compress(totals):
            small = ah.apply(model, alloc, inv=inv, progress=False)
        t2 = time.perf_counter()
    finally:
        if limit is not None:
            limit.unregister()
        torch.set_num_threads(threads)
    return small.eval(), alloc, t1 - t0, t2 - t1, dict(totals)


@torch.inference_mode()
def bench(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
    seconds: float,
) -> dict[str, tuple[float, float, float]]:
    """{variant: (median seconds, median of per-round ratios to 'dense', min / min dense)}."""
    for m in variants.values():
        for _ in range(warmup):
            m(x)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    start, r = time.perf_counter(), 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - start < seconds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            variants[k](x)
            times[k].append(time.perf_counter() - t)
        r += 1
    dense = times["dense"]
    return {
        k: (
            statistics.median(v),
            statistics.median(a / b for a, b in zip(v, dense)),
            min(v) / min(dense),
        )
        for k, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="budget 0.5 only, batch 1 only, 3 rounds; prints only"
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads for part (b)")
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["apply", "latency"],
        choices=["apply", "latency"],
        help="apply: time ah.apply (a); latency: time inference (b). Each writes its section.",
    )
    ap.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[1, 32],
        choices=[1, 32],
        help="batch sizes for part (b); a loaded machine may only afford batch 1",
    )
    ap.add_argument("--write", action="store_true", help="write RESULTS_engine.md even if --quick")
    args = ap.parse_args()
    write = args.write or not args.quick
    budgets = (0.5,) if args.quick else BUDGETS
    batches = (1,) if args.quick else tuple(args.batches)
    # (warmup, min rounds, max rounds, seconds) per batch size
    plan = (
        {1: (1, 3, 3, 0.0), 32: (1, 2, 2, 0.0)}
        if args.quick
        else {1: (2, 10, 50, 20.0), 32: (1, 3, 10, 15.0)}
    )
    load_start, t_start = _common.load_average(), time.perf_counter()
    _common.library_fingerprint()  # hash the sources this run imported, before they change
    torch.manual_seed(0)
    apply_rows, method_rows, latency = [], [], {}
    for name in args.models:
        torch.set_num_threads(os.cpu_count() or 1)
        model, inv = build_model(name)
        n_layers = len(inv.compressible)
        print(
            f"== {name}: {n_layers} compressible layers, {inv.total_params:,} params", flush=True
        )
        variants: dict[str, nn.Module] = {"dense": model}
        costs: dict[str, tuple[float, float]] = {"dense": (1.0, 1.0)}
        for want in budgets:
            budget = reachable_budget(inv, want)
            shown = f"{budget}" if budget == want else f"{budget} ({want} unreachable)"
            for method in VARIANTS:
                timing = "apply" in args.parts and method == "lowrank+sparse"
                settings = (False, True) if timing else (True,)
                for one in settings:
                    small, alloc, t_search, t_apply, totals = timed_apply(
                        model, inv, method, budget, one
                    )
                    c = alloc.cost(inv)
                    blas_s = "1" if one else "default"
                    print(
                        f"  apply {method:<15} budget {shown:<20} threads {blas_s:<7} "
                        f"search {t_search:6.2f}s apply {t_apply:7.2f}s  "
                        f"({len(alloc.layers)} layers, {c.params_fraction:.3f} params)",
                        flush=True,
                    )
                    apply_rows.append(
                        [
                            name,
                            method,
                            shown,
                            blas_s,
                            len(alloc.layers),
                            f"{c.params_fraction:.3f}",
                            f"{t_search:.2f}",
                            f"{t_apply:.2f}",
                        ]
                    )
                    if method == "lowrank+sparse":
                        for key, (secs, count) in sorted(totals.items()):
                            method_rows.append(
                                [
                                    name,
                                    shown,
                                    blas_s,
                                    key,
                                    count,
                                    f"{secs:.2f}",
                                    f"{1000 * secs / count:.1f}",
                                ]
                            )
                key = f"{method} @{budget}"
                variants[key] = small
                costs[key] = (c.params_fraction, c.macs_fraction)
        torch.set_num_threads(args.threads)
        latency[name, "_load"] = _common.load_average()
        for batch in batches if "latency" in args.parts else ():
            x = torch.randn(batch, *MODELS[name]["input_size"])
            t0 = time.perf_counter()
            res = bench(variants, x, *plan[batch])
            print(f"  latency batch {batch} ({time.perf_counter() - t0:.0f}s):", flush=True)
            for k, (sec, ratio, ratio_min) in res.items():
                print(
                    f"    {k:<24} {1000 * sec:9.1f} ms  x{ratio:.2f} of dense "
                    f"(min/min x{ratio_min:.2f})",
                    flush=True,
                )
                latency[name, k, batch] = (sec, ratio, ratio_min)
        latency[name, "_costs"] = costs
        del variants, model
    elapsed = time.perf_counter() - t_start
    load = (load_start, _common.load_average())
    apply_md, latency_md = report(args, apply_rows, method_rows, latency, batches, elapsed, load)
    print("\n" + "\n\n".join(md for md in (apply_md, latency_md) if md))
    if write:
        titles = []
        if "apply" in args.parts:
            titles.append(SECTION_APPLY)
            path = _common.write_section(SECTION_APPLY, apply_md)
        if "latency" in args.parts:
            titles.append(latency_title(args.threads))
            path = _common.write_section(titles[-1], latency_md)
        print(f"\nwrote sections {titles} of {path}")


def latency_title(threads: int) -> str:
    return f"{SECTION_LATENCY} ({threads} thread{'s' if threads > 1 else ''})"


def report(args, apply_rows, method_rows, latency, batches, elapsed, load) -> tuple[str, str]:
    prov = _common.provenance(elapsed, load)
    apply_md = "\n".join(
        [
            prov,
            "",
            "Wall time of `ah.apply(model, alloc)` over every compressible layer (stem and "
            "classifier stay dense), uniform allocations on params. 'search' is "
            "`Allocation.uniform` (the binary search for the per-layer level). Threads 'default' "
            "= torch's default (nproc) and numpy's OpenBLAS default; '1' = `torch.set_num_threads"
            "(1)` plus threadpoolctl limiting OpenBLAS and OpenMP to one thread (tensorly's "
            "tucker2 / cp run on numpy, svd on torch). One run per row, and other jobs share this "
            "machine, so single numbers can be off by a factor of several; compare rows within a "
            "model, measured minutes apart. efficientnet_b0 and the ViT are randomly "
            "initialised (nothing is downloaded); their layers get svd and sparse, whose work "
            "does not depend on the weights' values. Rows with threads '1' only for "
            "`lowrank` / `sparse`: those models are built for the latency part and are timed "
            "as a by-product.",
            "",
            _common.table(
                [
                    "model",
                    "method",
                    "budget",
                    "threads",
                    "layers",
                    "params frac",
                    "search s",
                    "apply s",
                ],
                apply_rows,
                "lllllrrr",
            ),
            "",
            "Per-method totals inside `ah.apply`, uniform `lowrank+sparse` (layers it cannot "
            "factorize, e.g. depthwise convs, fall back to `sparse`):",
            "",
            _common.table(
                [
                    "model",
                    "budget",
                    "threads",
                    "method (layer kind)",
                    "layers",
                    "total s",
                    "ms / layer",
                ],
                method_rows,
                "llllrrr",
            ),
        ]
    )
    if "apply" not in args.parts:
        apply_md = ""
    if "latency" not in args.parts:
        return apply_md, ""
    rows = []
    names = list(dict.fromkeys(k[0] for k in latency))
    names = [n for n in names if (n, "_costs") in latency]
    for name in names:
        costs = latency[name, "_costs"]
        for key, (pf, mf) in costs.items():
            row = [name, key, f"{pf:.3f}", f"{mf:.3f}"]
            for b in batches:
                sec, ratio, ratio_min = latency[name, key, b]
                row += [f"{1000 * sec:.1f}", f"{ratio:.2f}", f"{ratio_min:.2f}"]
            rows.append(row)
    head = ["model", "variant", "params frac", "MACs frac (sparse by nnz)"]
    for b in batches:
        head += [f"b{b} ms", f"b{b} x dense", f"b{b} min/min"]
    loads = [float(latency[n, "_load"].split(" / ")[0]) for n in names]
    cores = os.cpu_count() or 1
    warning = (
        f"**The machine was oversubscribed during this run** (1-minute load average up to "
        f"{max(loads):.1f} on {cores} cores, this process's {args.threads} thread(s) "
        "included), so threads were descheduled mid-forward. "
        + (
            "Multi-threaded timings then suffer far more than in proportion (OpenMP barriers "
            "wait on a descheduled thread): treat the ratios below as disturbed, especially "
            "where 'x dense' and 'min/min' disagree, and prefer a run on an idle machine or "
            "the 1-thread table."
            if args.threads > 1
            else "One thread is time-sliced roughly in proportion, so these ratios are less "
            "disturbed than multi-threaded ones, but still noisy."
        )
        if max(loads) > cores
        else ""
    )
    latency_md = "\n".join(
        [
            prov,
            "",
            *([warning, ""] if warning else []),
            f"CPU forward latency with `torch.set_num_threads({args.threads})` under "
            "`torch.inference_mode()`, random inputs. Each batch size: a warmup per variant, then "
            "interleaved rounds (one forward of every variant per round, rotating order) until "
            "the round minimum and a time budget are met (batch 1: 10-50 rounds / 20 s; batch "
            "32: 3-10 rounds / 15 s per model). 'ms' is the median; 'x dense' is the median over "
            "rounds of (variant time / dense time in the same round); 'min/min' is the fastest "
            "run of the variant over the fastest dense run. Absolute ms drift with the machine's "
            "load (1-minute load average when each model's timing began: "
            + ", ".join(f"{n} {latency[n, '_load'].split(' / ')[0]}" for n in names)
            + f", on {os.cpu_count()} cores); the ratios are the result, and where the two ratio "
            "columns disagree the measurement was disturbed.",
            "",
            "The sparse branches store only their nonzeros but run densely on CPU: the weight is "
            "scattered into a dense tensor on every forward and the ordinary dense conv / "
            "matmul runs. So `sparse` costs the dense layer plus the scatter, and "
            "`lowrank+sparse` costs the dense layer plus the low-rank chain. The MACs column "
            "counts sparse work by nonzeros (what a sparse kernel would do), which these "
            "latencies do not get. Only `lowrank` changes the dense work actually executed.",
            "",
            _common.table(head, rows, "ll" + "r" * (len(head) - 2)),
        ]
    )
    return apply_md, latency_md


if __name__ == "__main__":
    main()
