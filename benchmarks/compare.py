"""Method comparison on real CIFAR-10 checkpoints: the searched L+S pipeline against restricted
searches and the baselines every user would try, at one budget at a time.

For each model and (metric, budget) cell, eight allocations (see ``_compare_methods.py``) are
built on the same calibration subset; the three searches get the same number of evaluated
trials. Every result then gets the same short distillation fine-tune (same steps, lr, seed)
and is measured: test top-1 before and after, params / MACs fractions, CPU latency ratio to
the dense model at batch 1 and 64 (interleaved, same process), exported file size, wall time,
evaluations. One JSON per (cell, method), written atomically; searches live in their own
SQLite study, fine-tunes in resumable checkpoints, so rerunning the command skips finished
work and continues unfinished work.

    .venv/bin/python benchmarks/compare.py --quick     # one model, one cell, minutes
    .venv/bin/python benchmarks/compare.py             # the full grid (hours; resumable)
    .venv/bin/python benchmarks/compare.py --report    # RESULTS.md + Pareto PNGs from JSON
    .venv/bin/python benchmarks/compare.py --models cifar_resnet20 --cells params:0.3

Bulky state (studies, sensitivity tables, fine-tune checkpoints) goes to ``benchmarks/out/``
(git-ignored); the per-cell JSON to ``benchmarks/results/compare[-quick]/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common  # first: records the caller's thread settings
import torch
from _compare_methods import ALLOCATORS, METHOD_INFO, VARIANT_INFO
from engine_speed import bench

from autohybrid.allocation import Allocation
from autohybrid.apply import apply
from autohybrid.cost import allocation_cost, cost
from autohybrid.data import as_tensors, load_data
from autohybrid.evaluate import evaluate
from autohybrid.export import export
from autohybrid.finetune import FinetuneConfig, finetune
from autohybrid.inventory import inventory
from autohybrid.io import atomic_write_text
from autohybrid.layers import _SparseBase
from autohybrid.models import create_model
from autohybrid.search.objective import Evaluator
from autohybrid.search_space import load_search_space
from autohybrid.sensitivity import sensitivity

CKPT = _common.SHARED / "models" / "cifar10"
DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
# the order the full run takes: most informative first
MODELS = {
    "cifar_resnet20": CKPT / "resnet20-12fca82f.th",
    "mobilenetv3_small_100": CKPT / "mobilenetv3_small_100-cifar10.pth",
    "vit_tiny_patch16_224": CKPT / "vit_tiny_p8_d6-cifar10.pth",  # 6 blocks, patch 8, 32 px
    "cifar_resnet56": CKPT / "resnet56-4bfd9763.th",
}
CELLS = [(m, b) for m in ("params", "macs") for b in (0.5, 0.3, 0.2)]
OUT = _common.BENCH_DIR / "out" / "compare"
ALL_INFO = {**METHOD_INFO, **VARIANT_INFO}
RESULTS = _common.BENCH_DIR / "results"


@dataclass
class Settings:
    """Everything that decides a cell's numbers; a stored cell with other settings is redone."""

    calib: int = 512
    trials: int = 24
    max_groups: int = 24
    ft_steps: int = 50
    ft_batch: int = 128
    ft_lr: float = 1e-3
    test_limit: int = 2000
    seed: int = 0
    threads: int = 1


QUICK = Settings(calib=128, trials=6, ft_steps=8, ft_batch=64, test_limit=500)


def cell_name(model: str, metric: str, budget: float) -> str:
    return f"{model}-{metric}-{budget:g}"


class Context:
    """One model: checkpoint, data, calibration tensors, sensitivity table, evaluator."""

    def __init__(self, name: str, s: Settings, out: Path, res: Path):
        self.name, self.s, self.seed = name, s, s.seed
        self.trials, self.calib, self.max_groups = s.trials, s.calib, s.max_groups
        self.data_spec, self.out, self.res = DATA, out / name, res / name
        self.model = create_model(name, checkpoint=MODELS[name]).eval()
        self.size = (3, 32, 32)
        self.inv = inventory(self.model, self.size)
        self.space = load_search_space(name)
        self.data = load_data(DATA, self.model, input_size=self.size)
        self.test = torch.utils.data.Subset(self.data.test,
                                            range(min(s.test_limit, len(self.data.test))))
        x, y = as_tensors(self.data.calibration(s.calib, seed=s.seed))
        t = time.time()
        table = sensitivity(self.model, self.inv, self.space, x, y,
                            out_dir=self.out / f"sensitivity-c{s.calib}",
                            key_extra={"data": "cifar10", "seed": s.seed}, progress=False)
        self.table = table.df
        self.sens = _cached(self.out / f"sensitivity-c{s.calib}" / "wall.json",
                            lambda: {"wall_s": time.time() - t, "rows": len(table.df)})
        self.evaluator = Evaluator(self.model, self.inv, x, y, bool(table.meta["bn_recal"]))
        self.dense = _cached(self.res / "dense.json", self._dense, settings=s)

    def db(self, metric: str, budget: float, method: str = "") -> Path:
        """The cell's SQLite study storage; variants get their own file (they may run in a
        second process beside the main run, and SQLite serialises writers)."""
        name = f"study-{method}.db" if method in VARIANT_INFO else "study.db"
        path = self.out / cell_name(self.name, metric, budget) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _dense(self) -> dict:
        acc = evaluate(self.model, self.test, progress=False)["top1"]
        alloc = Allocation.for_inventory(self.inv, {})
        return {"test_top1": acc, "params": self.inv.total_params, "macs": self.inv.total_macs,
                "file_bytes": _export_bytes(self.model, alloc),
                "compressible_params": sum(la.params for la in self.space.compressible(
                    self.inv)) / self.inv.total_params,
                "compressible_macs": sum(la.macs for la in self.space.compressible(
                    self.inv)) / self.inv.total_macs}


def _cached(path: Path, make, settings: Settings | None = None) -> dict:
    want = dataclasses.asdict(settings) if settings else None
    if path.exists():
        d = json.loads(path.read_text())
        if want is None or d.get("settings") == want:
            return d
    d = make()
    if want is not None:
        d["settings"] = want
    atomic_write_text(path, json.dumps(d, indent=2))
    return d


def _export_bytes(model, alloc) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        export(model, alloc, tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.suffix == ".safetensors")


def _latency(dense, small, batch: int) -> dict:
    x = torch.randn(batch, 3, 32, 32)
    rounds = (20, 200, 3.0) if batch == 1 else (4, 20, 6.0)
    r = bench({"dense": dense, "small": small}, x, 2, *rounds)
    return {"dense_ms": 1e3 * r["dense"][0], "ms": 1e3 * r["small"][0],
            "ratio_median": r["small"][1], "ratio_min": r["small"][2]}


def _mask_agreement(small, masks: dict) -> float:
    """Share of the torch-pruning mask's kept weights the built sparse layers also keep."""
    kept = same = 0
    for name, mk in masks.items():
        mod = small.get_submodule(name)
        want = set(mk.flatten().nonzero().flatten().tolist())
        have = set(mod.indices.tolist()) if isinstance(mod, _SparseBase) else want
        kept, same = kept + len(want), same + len(want & have)
    return same / max(kept, 1)


def run_method(ctx: Context, metric: str, budget: float, method: str, res_dir: Path) -> dict:
    s = ctx.s
    t0 = time.time()
    r = ALLOCATORS[method](ctx, metric, budget)
    t_alloc = time.time() - t0
    row = {"model": ctx.name, "metric": metric, "budget": budget, "method": method,
           "label": ALL_INFO[method][0], "settings": dataclasses.asdict(s),
           "library": _common.library_fingerprint(), "date": _common.now(),
           "machine": _common.machine(), "load_average": _common.load_average()}
    masks = r.extra.pop("masks", None)
    row["extra"] = r.extra
    if r.layers is None:
        row.update(status="unreachable", reason=r.reason, alloc_wall_s=t_alloc)
        return row
    alloc = Allocation.for_inventory(ctx.inv, r.layers, budget=budget, metric=metric)
    c = allocation_cost(ctx.inv, r.layers)
    if not r.extra.get("control"):
        assert c.fraction(metric) <= budget + 1e-12, (method, c.fraction(metric), budget)
    small = apply(ctx.model, alloc, inv=ctx.inv, progress=False)
    measured = cost(small, ctx.size)
    scores = ctx.evaluator.score(r.layers)
    before = evaluate(small, ctx.test, progress=False)["top1"]
    t1 = time.time()
    ft = FinetuneConfig(steps=s.ft_steps, batch_size=s.ft_batch, lr=s.ft_lr, seed=s.seed,
                        save_every=20)
    ckpt = ctx.out / cell_name(ctx.name, metric, budget) / f"ft-{method}"
    finetune(small, ctx.model, ctx.data.train, ft, checkpoint_dir=ckpt, progress=False)
    t_ft = time.time() - t1
    after = evaluate(small, ctx.test, progress=False)["top1"]
    methods = {}
    for spec in r.layers.values():
        methods[spec.method] = methods.get(spec.method, 0) + 1
    row.update(
        status="ok", params_fraction=c.params_fraction, macs_fraction=c.macs_fraction,
        measured_params=measured.params, measured_macs=measured.macs,
        counted_params=c.params, counted_macs=c.macs,
        calib_kl=scores["kl"], calib_top1=scores["top1"],
        test_top1_before=before, test_top1_after=after, dense_test_top1=ctx.dense["test_top1"],
        latency_b1=_latency(ctx.model, small, 1), latency_b64=_latency(ctx.model, small, 64),
        file_bytes=_export_bytes(small, alloc), dense_file_bytes=ctx.dense["file_bytes"],
        alloc_wall_s=t_alloc, finetune_wall_s=t_ft,
        evaluations=r.evaluations,
        sensitivity_rows=ctx.sens["rows"] if ALL_INFO[method][1] != "fixed" else 0,
        layer_methods=methods, allocation=alloc.to_dict()["layers"],
    )
    if masks is not None:
        row["extra"]["mask_agreement"] = _mask_agreement(small, masks)
    shutil.rmtree(ckpt, ignore_errors=True)
    return row


def run(models: list[str], cells: list[tuple[str, float]], methods: list[str], s: Settings,
        tag: str) -> None:
    torch.set_num_threads(s.threads)
    res_root, out_root = RESULTS / tag, OUT.parent / tag
    want = dataclasses.asdict(s)
    for name in models:
        ctx = None
        for metric, budget in cells:
            cell = cell_name(name, metric, budget)
            for method in methods:
                path = res_root / name / cell / f"{method}.json"
                if path.exists() and json.loads(path.read_text()).get("settings") == want:
                    continue
                ctx = ctx or Context(name, s, out_root, res_root)
                t = time.time()
                print(f"[{_common.now()}] {cell} {method} ...", flush=True)
                row = run_method(ctx, metric, budget, method, path.parent)
                row["wall_s"] = time.time() - t
                atomic_write_text(path, json.dumps(row, indent=1))
                print(f"[{_common.now()}] {cell} {method}: {row['status']} "
                      f"before {row.get('test_top1_before', float('nan')):.2f} "
                      f"after {row.get('test_top1_after', float('nan')):.2f} "
                      f"in {row['wall_s']:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet20, params 0.3, tiny settings")
    ap.add_argument("--report", action="store_true", help="write RESULTS.md and plots only")
    ap.add_argument("--models", nargs="+", choices=list(MODELS))
    ap.add_argument("--cells", nargs="+", help="metric:budget, e.g. params:0.3 macs:0.2")
    ap.add_argument("--methods", nargs="+", choices=list(ALL_INFO),
                    help="default: the eight of the comparison; variants only when named")
    ap.add_argument("--tag", help="folder under benchmarks/results/ and benchmarks/out/ "
                    "(default compare, compare-quick with --quick). A cell whose stored "
                    "settings differ is redone, so runs with other settings belong in a tag "
                    "of their own")
    for f in dataclasses.fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default))
    args = ap.parse_args()
    base = QUICK if args.quick else Settings()
    s = dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in
                                     dataclasses.fields(Settings)
                                     if getattr(args, f.name) is not None})
    tag = args.tag or ("compare-quick" if args.quick else "compare")
    if args.report:
        from _compare_report import write_report

        path = _common.BENCH_DIR / ("RESULTS.md" if tag == "compare" else f"results/{tag}.md")
        print(write_report(RESULTS / tag, list(MODELS), CELLS, tag, path))
        return
    models = args.models or (["cifar_resnet20"] if args.quick else list(MODELS))
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells] if args.cells \
        else ([("params", 0.3)] if args.quick else CELLS)
    t = time.time()
    run(models, cells, args.methods or list(METHOD_INFO), s, tag)
    print(f"done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
