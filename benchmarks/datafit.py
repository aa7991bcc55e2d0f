"""Data-fitted layers against weight-fitted ones on the shared CIFAR-10 checkpoints, no
fine-tuning.

Per model and params budget (fraction of the whole model's params, the tool's budget) a fixed set
of allocations is built and applied twice where it makes sense: with every compressed layer
fitted to its weights (``fit: weights``) and to its outputs on calibration images
(``fit: data``, sequential in forward order unless the row says independent). Each result is
measured on the test split with BatchNorm as is and after re-estimating BatchNorm on the
calibration images, plus the KL to the dense model on the calibration images for both (the
lower one is what the tool would pick).

Rows (``--rows``):

    gm_w            global magnitude (one |w| threshold), weight fit
    gm_d_obs        the same layer sparsities, data fit; mask re-picked per layer by OBS
    gm_d_wanda      the same, mask re-picked by Wanda saliency
    gm_d_mag        the same, mask kept = global magnitude's |W| mask, values refit to the data
                    (``fit_sparse(mask_from=W)``; patched in here, the spec cannot say it)
    gm_d_obs_indep  gm_d_obs with ``meta.fit.sequential = False`` (dense-model inputs)
    gs_obs          global OBS saliency (``global_saliency(kind="obs")``), data fit, OBS masks
    gs_wanda        global Wanda saliency, data fit, Wanda masks
    lr_w / lr_d     uniform low-rank (``Allocation.uniform(method="lowrank")``), weight / data
    ls_w / ls_d     uniform low-rank + sparse, weight / data fit

    .venv/bin/python benchmarks/datafit.py --models cifar_resnet20          # resumable
    .venv/bin/python benchmarks/datafit.py --report                         # RESULTS_datafit.md

One JSON per (model, budget, row) under ``benchmarks/results/datafit/``, keyed by the settings
that decide its numbers; a rerun skips rows whose stored key matches. Input statistics are
cached under ``benchmarks/out/datafit/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import time
import traceback
from pathlib import Path

import _common  # first: records the caller's thread settings
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Subset, TensorDataset

from autohybrid.allocation import Allocation
from autohybrid.apply import apply
from autohybrid.data import as_tensors, load_data
from autohybrid.evaluate import evaluate, recalibrate_bn
from autohybrid.exceptions import BudgetError
from autohybrid.inventory import inventory
from autohybrid.io import atomic_write_text
from autohybrid.models import create_model
from autohybrid.search.params import ParamSpace, group_layers
from autohybrid.search.warm_start import global_magnitude, global_saliency
from autohybrid.search_space import load_search_space
from autohybrid.stats import input_stats

CKPT = _common.SHARED / "models" / "cifar10"
DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
MODELS = {  # the order of importance for this benchmark
    "cifar_resnet20": CKPT / "resnet20-12fca82f.th",
    "tf_efficientnet_lite0": CKPT / "efficientnet_lite0-cifar10.pth",  # 64x64 input
    "mobilenetv3_small_100": CKPT / "mobilenetv3_small_100-cifar10.pth",
    "vit_tiny_patch16_224": CKPT / "vit_tiny_p8_d6-cifar10.pth",
    "cifar_resnet56": CKPT / "resnet56-4bfd9763.th",
}
SIZES = {"tf_efficientnet_lite0": (3, 64, 64)}  # every other checkpoint: CIFAR's 32x32
BUDGETS = (0.5, 0.3, 0.2, 0.1)
RES = _common.BENCH_DIR / "results" / "datafit"
OUT = _common.BENCH_DIR / "out" / "datafit"
RESULTS = _common.BENCH_DIR / "RESULTS_datafit.md"
SEED = 0
DAMP = 0.01


@dataclasses.dataclass(frozen=True)
class Row:
    alloc: str  # gm | gs_obs | gs_wanda | lowrank | hybrid
    fit: str  # weights | data
    saliency: str = "obs"
    sequential: bool = True
    mask: str = "saliency"  # saliency | magnitude (sparse layers' mask under fit: data)
    label: str = ""


ROWS = {
    "gm_w": Row("gm", "weights", label="global magnitude, weight fit"),
    "gm_d_obs": Row("gm", "data", "obs", label="global magnitude sparsities, data fit, OBS mask"),
    "gm_d_wanda": Row("gm", "data", "wanda",
                      label="global magnitude sparsities, data fit, Wanda mask"),
    "gm_d_mag": Row("gm", "data", "obs", mask="magnitude",
                    label="global magnitude mask, data-refit values"),
    "gs_obs": Row("gs_obs", "data", "obs", label="global OBS saliency, data fit"),
    "gs_wanda": Row("gs_wanda", "data", "wanda", label="global Wanda saliency, data fit"),
    "lr_w": Row("lowrank", "weights", label="uniform low-rank, weight fit"),
    "lr_d": Row("lowrank", "data", label="uniform low-rank, data fit"),
    "ls_w": Row("hybrid", "weights", label="uniform L+S, weight fit"),
    "ls_d": Row("hybrid", "data", label="uniform L+S, data fit"),
    "gm_d_obs_indep": Row("gm", "data", "obs", sequential=False,
                          label="global magnitude sparsities, data fit, OBS mask, independent"),
}


def settings_key(model: str, budget: float, row: str, calib: int, test_limit: int | None) -> dict:
    return {"model": model, "checkpoint": MODELS[model].name, "budget": budget, "row": row,
            "spec": dataclasses.asdict(ROWS[row]), "calib": calib, "seed": SEED, "damp": DAMP,
            "test_limit": test_limit}


def row_path(model: str, budget: float, row: str) -> Path:
    return RES / model / f"{budget:g}" / f"{row}.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the magnitude-mask data fit: Sparse.fit with mask_from = the dense weight ---------------

@contextlib.contextmanager
def magnitude_masks(model: torch.nn.Module):
    """``sparse`` layers under ``fit: data`` keep the |W| mask of the dense weight (the weight
    fit's mask) and only refit the kept values; the package's ``fit_sparse`` supports this
    (``mask_from``) but ``Sparse.fit`` does not expose it, so it is patched for the duration."""
    from autohybrid.layers import sparse_module
    from autohybrid.methods import sparse as sp

    original = sp.Sparse.fit

    def fit(self, problem, bias, layer, spec, cache=None):
        w = model.get_submodule(layer.name).weight.detach().double()
        w = w.reshape(w.shape[0], -1)
        idx, values, approx = sp.fit_sparse(problem, problem.matrix(), layer, spec.sparsity,
                                            spec.pattern, mask_from=w)
        module = sparse_module(layer, idx.numel(), bias is not None)
        module.load_sparse(idx, values.to(module.values.dtype))
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module, approx

    sp.Sparse.fit = fit
    try:
        yield
    finally:
        sp.Sparse.fit = original


# -- one model ---------------------------------------------------------------------------


class Context:
    def __init__(self, name: str, calib: int, test_limit: int | None):
        self.name, self.calib, self.test_limit = name, calib, test_limit
        self.model = create_model(name, checkpoint=MODELS[name]).eval()
        # the size each checkpoint was trained at (the MobileNetV3 file records none, and
        # timm's config would say 224)
        self.size = SIZES.get(name, (3, 32, 32))
        self.inv = inventory(self.model, self.size)
        self.space = load_search_space(name)
        self.ps = ParamSpace(self.space, self.inv,
                             group_layers(self.space, self.inv, None, 10**9, 0), "params")
        self.data = load_data(DATA, self.model, input_size=self.size)
        test = self.data.test
        self.test = Subset(test, range(min(test_limit, len(test)))) if test_limit else test
        self.x, self.y = as_tensors(self.data.calibration(calib, seed=SEED))
        self.has_bn = any(isinstance(m, _BatchNorm) for m in self.model.modules())
        self._stats = None
        self.dense = self._dense()

    def _dense(self) -> dict:
        path = RES / self.name / "dense.json"
        key = {"model": self.name, "checkpoint": MODELS[self.name].name, "calib": self.calib,
               "seed": SEED, "test_limit": self.test_limit}
        d = _read(path)
        if d is None or d.get("key") != key:
            t = time.time()
            r = evaluate(fast(self.model), self.test, progress=False)
            d = {"key": key, "top1": r["top1"], "n": r["n"], "eval_s": time.time() - t,
                 "params": self.inv.params if hasattr(self.inv, "params") else None,
                 "input_size": list(self.size), "preprocess": repr(self.data.preprocess),
                 "layers": len(self.inv.compressible),
                 "space_layers": len(self.space.compressible(self.inv))}
            atomic_write_text(path, json.dumps(d, indent=1))
        calib = evaluate(self.model, TensorDataset(self.x, self.y), progress=False,
                         keep_logits=True)
        self.calib_logits = calib["logits"]
        log(f"{self.name}: dense {d['top1']:.2f} % on {d['n']} test images, input "
            f"{self.size}, {d['preprocess']}")
        return d

    def stats(self) -> tuple[object, float]:
        """Input statistics (H = X^T X) of the dense model for every layer the space
        searches, on the calibration images; cached on disk, seconds of the first pass."""
        if self._stats is None:
            layers = [la.name for la in self.space.compressible(self.inv)]
            t = time.time()
            st = input_stats(self.model, self.inv, layers, self.x,
                             out_dir=OUT / self.name / f"c{self.calib}",
                             key_extra={"data": "cifar10", "seed": SEED}, progress=False)
            secs = float(st.meta.get("seconds", time.time() - t))
            self._stats = (st, secs)
            log(f"{self.name}: input statistics {len(layers)} layers, {secs:.1f} s "
                f"({'cached' if st.meta.get('cached') else 'computed'})")
        return self._stats

    def allocation(self, row: Row, budget: float) -> tuple[Allocation | None, dict]:
        info: dict = {}
        t = time.time()
        if row.alloc == "gm":
            layers = global_magnitude(self.ps, self.model, budget)
        elif row.alloc in ("gs_obs", "gs_wanda"):
            st, secs = self.stats()
            info["stats_s"] = secs
            t = time.time()
            layers = global_saliency(self.ps, self.model, st, budget, row.alloc[3:])
        else:
            method = "lowrank" if row.alloc == "lowrank" else "lowrank+sparse"
            try:
                alloc = Allocation.uniform(self.inv, method=method, budget=budget,
                                           metric="params")
            except BudgetError as e:
                info["unreachable"] = str(e)
                return None, info
            layers = alloc.layers
        info["alloc_s"] = time.time() - t
        if layers is None:
            info["unreachable"] = "the allocator returned None (budget not reachable)"
            return None, info
        layers = {n: dataclasses.replace(s, fit=row.fit) for n, s in layers.items()}
        alloc = Allocation.for_inventory(self.inv, layers, budget=budget, metric="params")
        if row.fit == "data":
            alloc.meta["fit"] = {"saliency": row.saliency, "damp": DAMP,
                                 "sequential": row.sequential}
        return alloc, info

    def measure(self, small: torch.nn.Module) -> dict:
        out = {}
        variants = [("asis", small)]
        if self.has_bn:
            t = time.time()
            recal = copy.deepcopy(small)
            recalibrate_bn(recal, TensorDataset(self.x, torch.zeros(len(self.x))), batches=None,
                           progress=False)
            out["recal_s"] = time.time() - t
            variants.append(("recal", recal))
        for tag, m in variants:
            t = time.time()
            kl = evaluate(m, TensorDataset(self.x, self.y), progress=False,
                          reference=self.calib_logits)
            r = evaluate(fast(m), self.test, progress=False)
            out[tag] = {"top1": r["top1"], "loss": r["loss"], "calib_kl": kl["kl"],
                        "calib_agreement": kl["agreement"], "eval_s": time.time() - t}
        if not self.has_bn:
            out["recal"] = dict(out["asis"], note="no BatchNorm: recalibration is a no-op")
        out["choice"] = "recal" if out["recal"]["calib_kl"] < out["asis"]["calib_kl"] else "asis"
        out["top1_chosen"] = out[out["choice"]]["top1"]
        return out


def fast(model: torch.nn.Module) -> torch.nn.Module:
    """A channels-last copy for the test pass (same numbers, ~1.8x faster on CPU convs)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_row(ctx: Context, budget: float, name: str) -> dict:
    row = ROWS[name]
    doc: dict = {"key": settings_key(ctx.name, budget, name, ctx.calib, ctx.test_limit),
                 "label": row.label, "command": _common.command_line(),
                 "library": _common.library_fingerprint(), "date": _common.now(),
                 "machine": _common.machine()}
    alloc, info = ctx.allocation(row, budget)
    doc.update(info)
    if alloc is None:
        doc["status"] = "unreachable"
        return doc
    cost = alloc.cost(ctx.inv)
    doc["params_fraction"] = cost.params_fraction
    doc["macs_fraction"] = cost.macs_fraction
    doc["layers"] = len(alloc.layers)
    doc["methods"] = _count(s.method for s in alloc.layers.values())
    doc["mean_sparsity"] = _mean([s.sparsity for s in alloc.layers.values()
                                  if s.method in ("sparse", "lowrank+sparse")])
    calib = ctx.x if row.fit == "data" else None
    patch = magnitude_masks(ctx.model) if row.mask == "magnitude" else contextlib.nullcontext()
    t = time.time()
    with patch:
        small = apply(ctx.model, alloc, inv=ctx.inv, calibration=calib, progress=False)
    doc["apply_s"] = time.time() - t
    doc["apply_per_layer_s"] = doc["apply_s"] / max(1, len(alloc.layers))
    errs = getattr(small, "autohybrid_errors", {})
    finite = [v for v in errs.values() if math.isfinite(v)]
    doc["layer_error"] = {"kind": "output" if row.fit == "data" else "weight",
                          "mean": _mean(finite), "max": max(finite) if finite else None,
                          "nonfinite": [k for k, v in errs.items() if not math.isfinite(v)]}
    bad = [n for n, p in small.named_parameters() if not bool(torch.isfinite(p).all())]
    doc["nonfinite_params"] = bad
    doc.update(ctx.measure(small))
    doc["status"] = "ok"
    return doc


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def run(models: list[str], budgets: list[float], rows: list[str], calib: int,
        test_limit: int | None) -> None:
    torch.set_num_threads(1)
    for model in models:
        ctx = None
        for budget in budgets:
            for name in rows:
                path = row_path(model, budget, name)
                key = settings_key(model, budget, name, calib, test_limit)
                old = _read(path)
                if old and old.get("key") == key and old.get("status") in ("ok", "unreachable"):
                    log(f"{model} {budget:g} {name}: cached ({old['status']})")
                    continue
                if ctx is None:
                    ctx = Context(model, calib, test_limit)
                log(f"{model} {budget:g} {name}: {ROWS[name].label} ...")
                t = time.time()
                try:
                    doc = run_row(ctx, budget, name)
                except Exception as e:  # record it; a package bug is reported, not fixed here
                    doc = {"key": key, "label": ROWS[name].label, "status": "error",
                           "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc(),
                           "command": _common.command_line(),
                           "library": _common.library_fingerprint(), "date": _common.now()}
                doc["row_s"] = time.time() - t
                atomic_write_text(path, json.dumps(doc, indent=1))
                log(f"{model} {budget:g} {name}: {_summary(doc)} ({doc['row_s']:.0f} s)")
                report()


def _summary(doc: dict) -> str:
    if doc["status"] != "ok":
        return doc["status"] + " " + str(doc.get("error") or doc.get("unreachable", ""))[:200]
    return (f"params {doc['params_fraction']:.3f}, top1 as is {doc['asis']['top1']:.2f}, "
            f"recal {doc['recal']['top1']:.2f}, choice {doc['choice']}, apply "
            f"{doc['apply_s']:.1f} s")


# -- report ------------------------------------------------------------------------------

PAIRS = [  # (label, weight-fit row, data-fit row)
    ("global magnitude; data fit: OBS mask", "gm_w", "gm_d_obs"),
    ("global magnitude; data fit: Wanda mask", "gm_w", "gm_d_wanda"),
    ("global magnitude; data fit: same |W| mask", "gm_w", "gm_d_mag"),
    ("global magnitude; data fit: OBS mask, independent", "gm_w", "gm_d_obs_indep"),
    ("global OBS saliency (data fit only)", None, "gs_obs"),
    ("global Wanda saliency (data fit only)", None, "gs_wanda"),
    ("uniform low-rank", "lr_w", "lr_d"),
    ("uniform L+S", "ls_w", "ls_d"),
]
SPARSE_DATA = ("gm_d_obs", "gm_d_wanda", "gm_d_mag", "gs_obs", "gs_wanda")


def _load_all() -> dict:
    out: dict = {}
    for path in sorted(RES.glob("*/*/*.json")):
        model, budget, row = path.parts[-3], float(path.parts[-2]), path.stem
        d = _read(path)
        if d:
            out.setdefault(model, {}).setdefault(budget, {})[row] = d
    return out


def _cell(d: dict | None, field: str = "chosen") -> str:
    if d is None:
        return "—"
    if d["status"] == "unreachable":
        return "unreach."
    if d["status"] != "ok":
        return "ERROR"
    if field == "chosen":
        return f"{d['top1_chosen']:.2f}{'ʳ' if d['choice'] == 'recal' else ''}"
    return f"{d[field]['top1']:.2f}"


def _pair(dw, dd, field="chosen") -> str:
    if dw is None and dd is None:
        return "—"
    return _cell(dd, field) if dw is None else f"{_cell(dw, field)} → {_cell(dd, field)}"


def _searched_section() -> list[str]:
    """The "Searched allocations" section as it stands in RESULTS (written from
    ``datafit_search.py``'s results by hand): kept, not overwritten by a rewrite of the rows."""
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    start, end = text.find("## Searched allocations"), text.find("## Provenance")
    if start < 0 or end < start:
        return ["## Searched allocations", "",
                "Not written yet: run `benchmarks/datafit_search.py` and add its table here.", ""]
    return text[start:end].rstrip().split("\n") + [""]


def report() -> Path:
    allres = _load_all()
    parts = [
        "# Data-fitted layers: weight fit vs data fit, no fine-tuning",
        "",
        "Written by `benchmarks/datafit.py --report` from the JSON in "
        "`benchmarks/results/datafit/` (one file per model / budget / row; the exact command, "
        "library fingerprint, date and machine of each row are in its file). Budget = "
        "fraction of the whole model's params kept (`alloc.cost(inv).params_fraction` "
        "reached is in the detail tables). Every result is measured on the test split with "
        "BatchNorm as is and after re-estimating BatchNorm on the calibration images; "
        "ʳ marks where the recalibrated model has the lower KL to the dense model on the "
        "calibration images (the tool's per-result choice), and the summary tables show "
        "that choice's top-1. Data fits are sequential in forward order unless marked "
        "independent; damping 0.01. No fine-tuning anywhere.",
        "",
        "Row notes: *global magnitude* = one |w| threshold over the layers the model's search "
        "space compresses (`global_magnitude`); its data-fit rows keep every layer's sparsity "
        "but the sparse method re-picks its mask within the layer by the saliency (OBS or "
        "Wanda); the *same |W| mask* row keeps the weight fit's magnitude mask and refits "
        "only the kept values (`fit_sparse(mask_from=W)`, patched into `Sparse.fit` by the "
        "benchmark because a spec cannot say it). *Global saliency* = one threshold on "
        "`global_saliency` scores. *Uniform* rows = `Allocation.uniform` over all "
        "compressible layers (low-rank: the default factorization per layer kind, depthwise "
        "layers stay dense; L+S: half of each layer's level to the sparse residual, "
        "depthwise layers sparse). `unreach.` = the allocator cannot reach the budget; `—` = "
        "not run (the run stopped at the deadline; rerunning the command fills it in).",
        "",
    ]
    cmds: set[str] = set()
    for model in [m for m in MODELS if m in allres]:
        res = allres[model]
        dense = _read(RES / model / "dense.json") or {}
        budgets = sorted((b for b in res if b != "dense"), reverse=True)
        parts += [f"## {model}", ""]
        rows_any = [d for b in budgets for d in res[b].values()]
        for d in rows_any:
            if d.get("command"):
                cmds.add(d["command"])
        calibs = sorted({d["key"]["calib"] for d in rows_any if "key" in d})
        tls = sorted({str(d["key"].get("test_limit")) for d in rows_any if "key" in d})
        parts.append(
            f"Dense: **{dense.get('top1', float('nan')):.2f} %** top-1 on "
            f"{dense.get('n', '?')} test images; input {dense.get('input_size')}, "
            f"{dense.get('preprocess', '')}; {dense.get('space_layers', '?')} layers in the "
            f"search space, {dense.get('layers', '?')} compressible. Calibration images: "
            f"{', '.join(map(str, calibs))} (seed {SEED}); test limit: {', '.join(tls)} "
            "(None = the full 10,000).")
        parts.append("")
        head = ["allocation (weights → data)", *[f"{b:g}" for b in budgets]]
        for title, field in (("Top-1 %, the KL-chosen BN variant", "chosen"),
                             ("Top-1 %, BatchNorm as is", "asis"),
                             ("Top-1 %, BatchNorm recalibrated", "recal")):
            body = []
            for label, w, dd in PAIRS:
                cells = [_pair(res[b].get(w) if w else None, res[b].get(dd), field)
                         for b in budgets]
                if any(c != "—" for c in cells):
                    body.append([label, *cells])
            parts += [f"**{title}**", "", _common.table(head, body), ""]
        parts += ["**Where L+S beats sparse alone once both are fitted** (KL-chosen top-1; "
                  "sparse = the best of the data-fitted sparse rows at that budget). Note the "
                  "allocations differ: L+S is uniform per layer, the sparse rows are globally "
                  "allocated, so this compares the two recipes as a user gets them, not the "
                  "methods at equal per-layer budgets:", ""]
        parts += _lps_statements(res, budgets) + [""]
        flags = _flags(res, budgets)
        if flags:
            parts += ["**Data fit worse than weight fit, errors, non-finite values:**", "",
                      *flags, ""]
        parts += ["<details><summary>Detail: every row (accuracy, KL, params reached, "
                  "timings)</summary>", ""]
        dh = ["budget", "row", "params", "top-1 as is", "top-1 recal", "KL as is",
              "KL recal", "choice", "stats s", "apply s", "s / layer", "eval s", "row s"]
        body = []
        for b in budgets:
            for name in ROWS:
                d = res[b].get(name)
                if d is None:
                    continue
                if d["status"] != "ok":
                    body.append([f"{b:g}", name, d["status"], *[""] * 10])
                    continue
                body.append([
                    f"{b:g}", name, f"{d['params_fraction']:.3f}", f"{d['asis']['top1']:.2f}",
                    f"{d['recal']['top1']:.2f}", f"{d['asis']['calib_kl']:.4f}",
                    f"{d['recal']['calib_kl']:.4f}", d["choice"],
                    f"{d['stats_s']:.1f}" if "stats_s" in d else "",
                    f"{d['apply_s']:.1f}", f"{d['apply_per_layer_s']:.2f}",
                    f"{d['asis']['eval_s'] + _recal_eval_s(d):.0f}",
                    f"{d.get('row_s', 0):.0f}"])
        parts += [_common.table(dh, body, "ll" + "r" * (len(dh) - 2)), "", "</details>", ""]
        parts += _timing_lines(res, budgets) + [""]
    parts += [*_searched_section(), "## Provenance",
        "",
        "Commands that produced the rows above (from the repository root):",
        "",
        *[f"- `{c}`" for c in sorted(cmds)],
        "",
        f"- Machine: {_common.machine()}",
        f"- Report written {_common.now()}; autohybrid sources of the report step: sha256 "
        f"{_common.library_fingerprint()} (each row's own fingerprint is in its JSON: "
        f"{', '.join(sorted(_libraries(allres)))})",
    ]
    atomic_write_text(RESULTS, "\n".join(parts).rstrip() + "\n")
    return RESULTS


def _ok(d):
    return d is not None and d.get("status") == "ok"


def _lps_statements(res: dict, budgets: list[float]) -> list[str]:
    wins, losses, lines = [], [], []
    for b in budgets:
        ls = res[b].get("ls_d")
        sp = [(res[b][n]["top1_chosen"], n) for n in SPARSE_DATA if _ok(res[b].get(n))]
        if not _ok(ls) or not sp:
            continue
        best, who = max(sp)
        diff = ls["top1_chosen"] - best
        (wins if diff > 0 else losses).append(f"{b:g} ({ls['top1_chosen']:.2f} vs {who} "
                                              f"{best:.2f}, {diff:+.2f})")
    if wins:
        lines.append(f"- L+S (data fit) beats the best data-fitted sparse at budget "
                     f"{'; '.join(wins)}.")
    if losses:
        lines.append(f"- L+S (data fit) does not beat it at budget {'; '.join(losses)}.")
    if not lines:
        lines.append("- Not enough finished rows to compare.")
    return lines


def _flags(res: dict, budgets: list[float]) -> list[str]:
    out = []
    for b in budgets:
        for name, d in res[b].items():
            if d.get("status") == "error":
                out.append(f"- {b:g} {name}: **{d['error'][:300]}**")
            elif _ok(d) and (d["nonfinite_params"] or d["layer_error"]["nonfinite"]):
                out.append(f"- {b:g} {name}: non-finite parameters {d['nonfinite_params'][:5]} "
                           f"/ layer errors {d['layer_error']['nonfinite'][:5]}")
        for _, w, dd in PAIRS:
            dw, ddd = res[b].get(w) if w else None, res[b].get(dd)
            if _ok(dw) and _ok(ddd):
                worse = [f for f in ("asis", "recal") if ddd[f]["top1"] < dw[f]["top1"]]
                klw = [f for f in ("asis", "recal") if ddd[f]["calib_kl"] > dw[f]["calib_kl"]]
                if worse or klw:
                    out.append(
                        f"- {b:g} {dd} vs {w}: data fit lower top-1 ({', '.join(worse) or '—'}: "
                        + ", ".join(f"{dw[f]['top1']:.2f} → {ddd[f]['top1']:.2f}" for f in worse)
                        + f"); higher calibration KL ({', '.join(klw) or '—'})")
    return out


def _recal_eval_s(d: dict) -> float:
    return d["recal"].get("eval_s", 0) if "note" not in d["recal"] else 0


def _libraries(allres: dict) -> set[str]:
    return {d.get("library", "?") for r in allres.values() for bb in r.values()
            for d in bb.values()}


def _timing_lines(res: dict, budgets: list[float]) -> list[str]:
    def avg(name, field):
        v = [res[b][name][field] for b in budgets
             if _ok(res[b].get(name)) and field in res[b][name]]
        return (sum(v) / len(v), len(v)) if v else (None, 0)

    lines = ["**Timings** (one core, averaged over the budgets that ran): "]
    st = [res[b][n]["stats_s"] for b in budgets for n in ("gs_obs", "gs_wanda")
          if _ok(res[b].get(n)) and "stats_s" in res[b][n]]
    if st:
        lines.append(f"- statistics pass (H = XᵀX of every searched layer, dense model, "
                     f"calibration images): {st[0]:.1f} s")
    for name in ROWS:
        a, n = avg(name, "apply_s")
        p, _ = avg(name, "apply_per_layer_s")
        if a is not None:
            lines.append(f"- {name}: apply {a:.1f} s ({p:.2f} s / layer), {n} budget(s)")
    a, _ = avg("gm_d_obs", "apply_s")
    i, _ = avg("gm_d_obs_indep", "apply_s")
    if a is not None and i is not None:
        lines.append(f"- sequential vs independent data fit (global magnitude, OBS): "
                     f"{a:.1f} s vs {i:.1f} s (independent includes its own statistics pass)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--report", action="store_true", help="only write RESULTS_datafit.md")
    p.add_argument("--scratch", type=Path, default=None,
                   help="write rows and report under this folder instead (smoke tests)")
    a = p.parse_args()
    if a.scratch is not None:
        global RES, RESULTS
        RES, RESULTS = a.scratch / "results", a.scratch / "RESULTS_datafit.md"
    if a.report:
        print(report())
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(a.models, a.budgets, a.rows, a.calib, a.test_limit)
    print(report())


if __name__ == "__main__":
    main()
