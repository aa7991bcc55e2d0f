"""Method comparison on the shared CIFAR-10 checkpoints: what ``autohybrid search`` returns
against restricted searches and the allocations a user would try instead, every row given the
same total fine-tune budget, on the full 10,000-image test split.

Every row is built by the package's own stages (``_compare_methods.py``): the search rows are
``run_search`` itself (data-fitted layers, the study, the candidate pool halved over fine-tune
steps on the validation split, the winner fine-tuned); the fixed rows take the search's own
setup (``setup_search``: the same calibration, validation and fine-tune splits, input
statistics and sensitivity table), are built as the search hands a candidate on
(``select.fit_candidate``: sequential data fit, BatchNorm choice on validation) and get the
whole ladder's budget as one fine-tune with the same recipe. Choices are made on the
validation split; the test split is only reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --quick   # smoke run, minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py \\
        --models cifar_resnet56 --cells params:0.2 --rows autohybrid global_magnitude
    .venv/bin/python benchmarks/compare.py --report   # RESULTS_compare.md's tables from the JSON

One JSON per (cell, row) in ``benchmarks/results/<tag>/``, written atomically and skipped on a
rerun when its settings match; everything bulky (studies, statistics, sensitivity tables,
fine-tune checkpoints) in ``benchmarks/out/<tag>/``, so an interrupted run continues where it
stopped. The sensitivity table and input statistics are computed once per model and shared by
its cells (their cache keys hold the space, data and seed, not the budget).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import _common  # first: records the caller's thread settings
import torch
from _compare_methods import ROWS, fixed_layers, restrict

from autohybrid.allocation import Allocation
from autohybrid.config import SearchConfig
from autohybrid.cost import allocation_cost
from autohybrid.finetune import finetune
from autohybrid.io import atomic_write_text
from autohybrid.search.run import SearchSetup, load_model, run_search, setup_search
from autohybrid.search.select import Validation, fit_candidate, recipe, test_top1
from autohybrid.search.study import fit_meta
from autohybrid.search_space import load_search_space

CKPT = _common.SHARED / "models" / "cifar10"
DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
MODELS = {  # name -> checkpoint, input size (None: the model's own)
    "cifar_resnet20": (CKPT / "resnet20-12fca82f.th", None),
    "cifar_resnet56": (CKPT / "resnet56-4bfd9763.th", None),
    "mobilenetv3_small_100": (CKPT / "mobilenetv3_small_100-cifar10.pth", None),
    "vit_tiny_patch16_224": (CKPT / "vit_tiny_p8_d6-cifar10.pth", None),
    "tf_efficientnet_lite0": (CKPT / "efficientnet_lite0-cifar10.pth", [3, 64, 64]),
}
CELLS = [(m, b) for m in ("params", "macs") for b in (0.5, 0.3, 0.2)] + [("params", 0.1)]
RESULTS = _common.BENCH_DIR / "results"
OUT = _common.BENCH_DIR / "out"


@dataclass
class Settings:
    """What decides a cell's numbers (a stored row with other settings is redone). The
    defaults are the package's: ``autohybrid search`` as a user runs it."""

    calib: int = 1024
    val: int = 1000
    trials: int = 40
    candidates: int = 6
    finetune_budget: int = 800  # fine-tune steps every row gets in all
    test_limit: int | None = None  # None: the full test split
    seed: int = 0
    threads: int = 1


QUICK = Settings(calib=128, val=200, trials=6, candidates=3, finetune_budget=24,
                 test_limit=500)


def cell_name(model: str, metric: str, budget: float) -> str:
    return f"{model}-{metric}-{budget:g}"


def config(model: str, metric: str, budget: float, row: str, s: Settings,
           tag: str) -> SearchConfig:
    """The search config of ``row`` in the cell: the package's defaults and ``s``; a search
    row cut to one family reads its space from a file beside its output."""
    ckpt, size = MODELS[model]
    out = OUT / tag / model / cell_name(model, metric, budget) / row
    cfg = SearchConfig(model=model, checkpoint=str(ckpt), input_size=size, data=DATA,
                       budget=budget, metric=metric, out=str(out), seed=s.seed,
                       calib=s.calib, val=s.val, trials=s.trials, candidates=s.candidates,
                       finetune_budget=s.finetune_budget, test_limit=s.test_limit)
    keep = ROWS[row].space
    if keep is not None:
        space = restrict(load_search_space(model), keep)
        path = out / "space.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataclasses.replace(space, name=f"{model}-{row}").save(path)
        cfg.search_space = str(path)
    # one sensitivity table and one set of input statistics per model and space
    shared = OUT / tag / model / f"sensitivity-{'all' if keep is None else row}"
    shared.mkdir(parents=True, exist_ok=True)
    link = out / "sensitivity"
    if not link.exists():
        out.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shared, target_is_directory=True)
    return cfg


CANDIDATE_KEYS = ("trial", "family", "origin", "test_top1_before")


def search_row(cfg: SearchConfig) -> dict:
    """``autohybrid search`` on ``cfg``: what it returned and the candidates it weighed."""
    run_search(cfg)
    rows = json.loads((Path(cfg.out) / "pareto.json").read_text())
    won = next(r for r in rows if r.get("returned"))
    steps = sorted(int(k.rsplit("_", 1)[1]) for k in won if k.startswith("val_top1_step_"))
    return {"status": "ok", "test_top1_before": won["test_top1_before"],
            "test_top1_after": won["test_top1_after"],
            "val_top1_before": won[f"val_top1_step_{steps[0]}"],
            "val_top1_after": won[f"val_top1_step_{steps[-1]}"],
            "params_fraction": won["params_fraction"], "macs_fraction": won["macs_fraction"],
            "finetune_steps": steps[-1], "bn_recal": won.get("bn_recal"),
            "returned": {k: won.get(k) for k in ("trial", "family", "origin", "kl")},
            "candidates": [{k: v for k, v in r.items() if k in CANDIDATE_KEYS
                            or k.startswith("val_top1_step_")} for r in rows],
            "latency_b1": won.get("latency_ratio_b1"), "latency_b64": won.get("latency_ratio_b64")}


def dense_setup(cfg: SearchConfig) -> SearchSetup:
    """What the dense control needs of the search's setup: the model and the same splits
    (no statistics, sensitivity table or study)."""
    from autohybrid.data import load_data
    from autohybrid.inventory import inventory

    model, size = load_model(cfg)
    data = load_data(cfg.data, model, input_size=size)
    return SearchSetup(cfg, model, size, data, data.splits(cfg.calib, cfg.val, seed=cfg.seed),
                       inventory(model, size), None, None, None, None, {}, None, "")


def fixed_row(name: str, setup: SearchSetup, s: Settings, val: Validation) -> dict:
    """Row ``name`` built on the search's ``setup`` as a candidate is handed on, then
    fine-tuned for the whole budget with the search's recipe (resumable)."""
    cfg = setup.cfg
    if ROWS[name].kind == "control":
        layers, note = {}, "the dense model"
        alloc = Allocation.for_inventory(setup.inv, {})
        small, chosen = copy.deepcopy(setup.model), {"bn_recal": False}
    else:
        layers, note = fixed_layers(name, setup)
        if layers is None:
            return {"status": "unreachable", "reason": note}
        fit = ROWS[name].fit or cfg.fit
        meta = fit_meta(dataclasses.replace(cfg, fit=fit))
        alloc = Allocation.for_inventory(
            setup.inv, {n: dataclasses.replace(sp, fit=fit) for n, sp in layers.items()},
            budget=cfg.budget, metric=cfg.metric,
            meta={"fit": {k: v for k, v in meta.items() if k != "mode"}} if fit == "data"
            else {})
        small, chosen = fit_candidate(setup, alloc, val)
    c = allocation_cost(setup.inv, alloc.layers)
    if ROWS[name].kind != "control":
        assert c.fraction(cfg.metric) <= cfg.budget + 1e-12, name
    before, val_before = test_top1(setup, small), val.top1(small, cfg.batch_size)
    ckpt = Path(cfg.out).parent / name
    ft = recipe(setup, s.finetune_budget, save_every=max(1, s.finetune_budget // 8))
    finetune(small, setup.model, setup.splits.finetune, ft, checkpoint_dir=ckpt, progress=False)
    methods: dict[str, int] = {}
    for spec in alloc.layers.values():
        methods[spec.method] = methods.get(spec.method, 0) + 1
    return {"status": "ok", "note": note, "test_top1_before": before,
            "test_top1_after": test_top1(setup, small), "val_top1_before": val_before,
            "val_top1_after": val.top1(small, cfg.batch_size),
            "params_fraction": c.params_fraction, "macs_fraction": c.macs_fraction,
            "finetune_steps": s.finetune_budget, "bn_recal": chosen["bn_recal"],
            "layer_methods": methods, "allocation": alloc.to_dict()["layers"]}


def run(models: list[str], cells: list[tuple[str, float]], rows: list[str], s: Settings,
        tag: str) -> None:
    torch.set_num_threads(s.threads)
    want = dataclasses.asdict(s)
    for model in models:
        for metric, budget in cells:
            cell = cell_name(model, metric, budget)
            setup = val = None
            for name in rows:
                path = RESULTS / tag / model / cell / f"{name}.json"
                if path.exists() and json.loads(path.read_text()).get("settings") == want:
                    continue
                print(f"[{_common.now()}] {cell} {name} ...", flush=True)
                t = time.time()
                try:
                    cfg = config(model, metric, budget, "autohybrid", s, tag)
                    if ROWS[name].kind == "search":
                        row = search_row(config(model, metric, budget, name, s, tag))
                    elif ROWS[name].kind == "control" and setup is None:
                        dense = dense_setup(cfg)  # no sensitivity table needed
                        row = fixed_row(name, dense, s, Validation.of(dense))
                    else:
                        if setup is None:  # the search's own setup (its files are cached)
                            setup = setup_search(cfg)
                            val = Validation.of(setup)
                        row = fixed_row(name, setup, s, val)
                except Exception as e:  # noqa: BLE001 - a budget a space cannot reach
                    if type(e).__name__ != "BudgetError":
                        raise
                    row = {"status": "unreachable", "reason": str(e)}
                row.update(model=model, metric=metric, budget=budget, row=name,
                           label=ROWS[name].label, settings=want, wall_s=time.time() - t,
                           library=_common.library_fingerprint(), date=_common.now(),
                           machine=_common.machine(), load_average=_common.load_average())
                atomic_write_text(path, json.dumps(row, indent=1))
                print(f"[{_common.now()}] {cell} {name}: {row['status']} before "
                      f"{row.get('test_top1_before', float('nan')):.2f} after "
                      f"{row.get('test_top1_after', float('nan')):.2f} in "
                      f"{row['wall_s']:.0f} s", flush=True)


# -- report -------------------------------------------------------------------------------
def noise(p: float, n: int) -> float:
    """Half-width (points) of the 95 % interval of a difference of two top-1s measured on
    ``n`` images each near ``p`` %, as if independent (the same images make it smaller)."""
    q = p / 100
    return 100 * 1.96 * math.sqrt(2 * q * (1 - q) / n)


def report(tag: str, models: list[str]) -> str:
    stored = {}
    for p in sorted((RESULTS / tag).glob("*/*/*.json")):
        d = json.loads(p.read_text())
        stored[(d["model"], d["metric"], float(d["budget"]), d["row"])] = d
    n_test = {}
    lines = ["## Searched L+S against the best other row (test top-1 after the fine-tune)", "",
             "| model | cell | autohybrid | best other row | Δ | 95 % noise | verdict |",
             "|---|---|---|---|---|---|---|"]
    detail = []
    for model in models:
        for metric, budget in CELLS:
            got = {r: d for (m, me, b, r), d in stored.items()
                   if (m, me, b) == (model, metric, budget)}
            if not got:
                continue
            limit = next(iter(got.values()))["settings"]["test_limit"]
            n_test[model] = limit or 10000
            dense = got.get("dense_finetuned")
            detail += [f"### {model}, {metric} {budget:g}", "",
                       "| row | test before | test after | val before → after | params | "
                       "MACs | BN recal | steps | wall s |",
                       "|---|---|---|---|---|---|---|---|---|"]
            for name, row in ROWS.items():
                d = got.get(name)
                if d is None:
                    continue
                if d["status"] != "ok":
                    detail.append(f"| {row.label} | {d['status']}: {d.get('reason', '')} "
                                  "| | | | | | | |")
                    continue
                detail.append(
                    f"| {row.label} | {d['test_top1_before']:.2f} | "
                    f"**{d['test_top1_after']:.2f}** | {d['val_top1_before']:.2f} → "
                    f"{d['val_top1_after']:.2f} | {d['params_fraction']:.3f} | "
                    f"{d['macs_fraction']:.3f} | {d['bn_recal']} | {d['finetune_steps']} | "
                    f"{d['wall_s']:.0f} |")
            if dense and dense["status"] == "ok":
                moved = dense["test_top1_after"] - dense["test_top1_before"]
                detail.append(f"\nThe dense control moved {moved:+.2f} points "
                              f"({dense['test_top1_before']:.2f} → "
                              f"{dense['test_top1_after']:.2f}).")
            ah = got.get("autohybrid")
            others = {k: d for k, d in got.items() if k not in ("autohybrid", "dense_finetuned")
                      and d["status"] == "ok"}
            if ah and ah["status"] == "ok" and others:
                best = max(others, key=lambda k: others[k]["test_top1_after"])
                a, b = ah["test_top1_after"], others[best]["test_top1_after"]
                nz = noise(max(a, b), n_test[model])
                verdict = "ahead" if a - b > nz else "behind" if b - a > nz else "tie (noise)"
                lines.append(f"| {model} | {metric} {budget:g} | {a:.2f} | {b:.2f} "
                             f"({ROWS[best].label}; {len(others)} rows) | {a - b:+.2f} | "
                             f"±{nz:.2f} | {verdict} |")
            detail.append("")
    return "\n".join(lines + [""] + detail)


START, END = ("<!-- generated by compare.py --report: start -->",
              "<!-- generated by compare.py --report: end -->")


def write_report(path: Path, tables: str) -> None:
    """Replace the generated part of ``path`` (between the markers) with ``tables``; the
    text written by hand around it is kept."""
    text = path.read_text() if path.exists() else "# Method comparison\n\n"
    head, _, rest = text.partition(START)
    tail = rest.partition(END)[2] if rest else ""
    atomic_write_text(path, f"{head.rstrip()}\n\n{START}\n{tables.strip()}\n{END}\n"
                            f"{tail.lstrip() and chr(10) + tail.lstrip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet20, params 0.3, tiny settings")
    ap.add_argument("--report", action="store_true", help="print the tables from the JSON")
    ap.add_argument("--models", nargs="+", choices=list(MODELS))
    ap.add_argument("--cells", nargs="+", help="metric:budget, e.g. params:0.3 macs:0.2")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: all")
    ap.add_argument("--tag", help="folder under benchmarks/results/ and benchmarks/out/ "
                    "(default compare-v2, compare-v2-quick with --quick)")
    for f in dataclasses.fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int)
    args = ap.parse_args()
    s = dataclasses.replace(QUICK if args.quick else Settings(),
                            **{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                               if getattr(args, f.name) is not None})
    tag = args.tag or ("compare-v2-quick" if args.quick else "compare-v2")
    models = args.models or (["cifar_resnet20"] if args.quick else list(MODELS))
    if args.report:
        path = _common.BENCH_DIR / ("RESULTS_compare.md" if tag == "compare-v2"
                                    else f"results/{tag}.md")
        write_report(path, report(tag, models))
        print(path.read_text())
        return
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells] if args.cells \
        else ([("params", 0.3)] if args.quick else CELLS)
    t = time.time()
    run(models, cells, args.rows or list(ROWS), s, tag)
    print(f"done in {time.time() - t:.0f} s; command: `{_common.command_line()}`")


if __name__ == "__main__":
    main()
