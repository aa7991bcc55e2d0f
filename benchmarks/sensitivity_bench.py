"""Sensitivity engine: speed of the cached-cone path, which calibration signal predicts the
test-set drop, what BatchNorm recalibration recovers, ordering sanity, CLI cache / resume.

Parts (``--parts``, default all, run in this order):

cli      ``autohybrid sensitivity`` on cifar_resnet20 (shared checkpoint, 1,024 calibration
         images, default space): a fresh run (timed), the same command again (must be served
         from the cache), then a run into a fresh folder killed with SIGKILL once the partial
         CSV holds a few layers, and its rerun, which must continue where it stopped and give
         the same table as the uninterrupted run. The finished table is reused by the
         ``signals`` and ``order`` parts when its BatchNorm recalibration is off.
speed    Wall time of ``sensitivity(..., naive=False)`` (cached cone) vs ``naive=True`` (one
         full forward per candidate) in the same process, for cifar_resnet20 and
         mobilenetv3_small_100 (shared checkpoints, 32x32), bn_recal off and on. To keep the
         whole benchmark near 40 minutes on a shared 2-core machine, both paths run on
         every ``--stride``-th layer starting at ``--offset`` (default 3 and 1: the same mean
         depth as the full list) and the naive time of the full list is extrapolated per
         candidate (a naive candidate costs one full forward wherever its layer sits). Also
         the largest difference between the two tables. MobileNetV3's layers come in threes
         per block (depthwise, expansion, projection), so stride 3 picks every block's
         projection conv: the right mean depth, but no depthwise layer.
free     cifar_resnet20, same layers, bn_recal off: the cone path as shipped, the cone path
         with ``ConeRunner.run_cone`` patched (in this process only) to free each cone value
         after its last use, and naive: why the cone path gains less than its cone sizes
         promise.
signals  cifar_resnet20: for ``--cands`` candidates of every layer, the compressed model
         (``ah.apply`` of that one layer) is evaluated on the first ``--test-images`` CIFAR-10
         test images; Spearman correlation of the test top-1 drop with dloss, -dtop1, kl,
         disagreement and rel_error of the bn_recal=False table (bootstrap 95 % CI over pairs).
         With ``--signals-recal`` also against the bn_recal=True table, the test model having
         the BatchNorms downstream of its layer re-estimated on the same 256 calibration
         images the engine uses.
bn       For the ``--severe`` pairs with the largest test drop: test top-1 without BN
         recalibration, with ``recalibrate_bn`` of the whole compressed model on the 1,024
         calibration images, and with only the downstream BatchNorms re-estimated (what the
         engine does); the dense model recalibrated the same way, on clean and on augmented
         (pad-4 crop + flip) images; what ``bn_recal="auto"`` decides for both models.
order    Within every layer of the cifar_resnet20 bn_recal=False table: does kl / dloss get
         worse as the rank falls (same method) or the sparsity rises? Every inversion is
         listed with its paired standard error over the calibration images (recomputed
         per image through ``ah.apply``); beyond noise means more than 2 SE.

    .venv/bin/python benchmarks/sensitivity_bench.py                  # all, writes RESULTS
    .venv/bin/python benchmarks/sensitivity_bench.py --parts speed    # one part
    .venv/bin/python benchmarks/sensitivity_bench.py --quick          # smoke run, prints only

Torch runs with ``--threads`` (default 1: on a shared 2-core machine two threads contend and
run slower; the CLI subprocesses get the same through OMP_NUM_THREADS). Scratch files go to
``--scratch`` (default /tmp/sensitivity_bench), the CLI's output to ``--cli-out`` (default
/tmp/sens_r20, emptied first) and ``<cli-out>_killed``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import _common  # first: records the caller's thread settings
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Subset, TensorDataset

import autohybrid as ah
from autohybrid.data import as_tensors, load_data
from autohybrid.evaluate import estimating, evaluate, recalibrate_bn
from autohybrid.models import create_model
from autohybrid.search_space import load_search_space
from autohybrid.sensitivity import (
    ConeRunner,
    SensitivityTable,
    sensitivity,
    spec_from_row,
    swapped,
)

RESULTS = _common.BENCH_DIR / "RESULTS_sensitivity.md"
HEAD = (
    "# Sensitivity engine benchmarks\n\nRecorded by `benchmarks/sensitivity_bench.py`; each "
    "section says which command, when and on what machine.\n"
)
DATA = "cifar10:../shared/data/cifar10"
CHECKPOINTS = {
    "cifar_resnet20": "../shared/models/cifar10/resnet20-12fca82f.th",
    "mobilenetv3_small_100": "../shared/models/cifar10/mobilenetv3_small_100-cifar10.pth",
}
R20 = "cifar_resnet20"
SIZE = (3, 32, 32)
KEY_COLS = ["layer", "method", "factorization", "rank", "sparsity", "pattern", "refine"]
VALUE_COLS = ["rel_error", "loss", "top1", "kl", "agreement"]
# name -> (column, sign): sign * column grows with the damage
SIGNALS = {
    "dloss": ("dloss", 1),
    "dtop1": ("dtop1", -1),
    "kl": ("kl", 1),
    "disagreement": ("disagreement", 1),
    "rel_error": ("rel_error", 1),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup(name: str, n_calib: int) -> SimpleNamespace:
    model = create_model(name, checkpoint=CHECKPOINTS[name]).eval()
    data = load_data(DATA, model, input_size=SIZE[-1])
    calib = data.calibration(n_calib, seed=0)
    x, y = as_tensors(calib)
    inv = ah.inventory(model, SIZE)
    space = load_search_space(name)
    layers = space.compressible(inv)
    return SimpleNamespace(
        name=name,
        model=model,
        data=data,
        calib=calib,
        x=x,
        y=y,
        inv=inv,
        space=space,
        layers=[la.name for la in layers],
        cands={la.name: len(space.candidates(la)) for la in layers},
    )


def max_abs_diff(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    a, b = a.copy(), b.copy()
    for df in (a, b):
        df["rank"] = df["rank"].astype(str)
        df["factorization"] = df["factorization"].astype(str)
    m = a.merge(b, on=KEY_COLS, suffixes=("_a", "_b"), how="outer", indicator=True)
    if (m["_merge"] != "both").any():
        raise AssertionError(f"tables hold different rows: {m[m._merge != 'both'][KEY_COLS]}")
    return {
        c: float((m[f"{c}_a"].astype(float) - m[f"{c}_b"].astype(float)).abs().max())
        for c in VALUE_COLS
    }


# --------------------------------------------------------------------------- speed


def timed_table(s, layers, bn_recal, naive):
    """(seconds, table, per-layer seconds) of one sensitivity call."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    table = sensitivity(
        s.model,
        s.inv,
        s.space,
        s.x,
        s.y,
        bn_recal=bn_recal,
        naive=naive,
        layers=layers,
        progress=False,
        on_layer=lambda _: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    per = np.diff([t0, *stamps])
    return total, table, dict(zip(layers, per))


def part_speed(args) -> str:
    out = []
    summary = []
    for name in args.models:
        s = setup(name, args.calib)
        layers = s.layers[args.offset :: args.stride] if not args.quick else s.layers[1:3]
        n_sub = sum(s.cands[la] for la in layers)
        n_all = sum(s.cands.values())
        log(
            f"speed {name}: {len(layers)}/{len(s.layers)} layers, {n_sub}/{n_all} candidates, "
            f"{len(s.x)} images"
        )
        sensitivity(
            s.model,
            s.inv,
            s.space,
            s.x[:64],
            s.y[:64],
            bn_recal=False,
            layers=layers[:1],
            progress=False,
        )  # warm-up
        rows, per_layer = [], []
        for bn_recal in (False, True):
            res = {}
            for naive in (False, True):
                load = os.getloadavg()[0]
                res[naive] = timed_table(s, layers, bn_recal, naive)
                log(
                    f"  bn_recal={bn_recal} {'naive' if naive else 'cone '}: "
                    f"{res[naive][0]:.1f} s (load {load:.1f})"
                )
            diff = max_abs_diff(res[False][1].df, res[True][1].df)
            ratio = res[True][0] / res[False][0]
            log(f"  bn_recal={bn_recal}: naive / cone = {ratio:.2f}x; max |diff| {diff}")
            rows.append(
                [
                    "on" if bn_recal else "off",
                    f"{res[False][0]:.1f}",
                    f"{res[True][0]:.1f}",
                    f"**{ratio:.2f}x**",
                    f"{res[True][0] * n_all / n_sub / 60:.1f}",
                    f"{diff['rel_error']:.1e}",
                    f"{diff['loss']:.1e}",
                    f"{diff['kl']:.1e}",
                    f"{diff['top1']:.3f}",
                    f"{diff['agreement']:.3f}",
                ]
            )
            summary.append((name, bn_recal, ratio))
            for la in layers:
                per_layer.append(
                    [
                        la,
                        s.cands[la],
                        "on" if bn_recal else "off",
                        f"{res[False][2][la]:.1f}",
                        f"{res[True][2][la]:.1f}",
                        f"{res[True][2][la] / res[False][2][la]:.1f}x",
                    ]
                )
        out.append(
            f"### {name}\n\n{len(layers)} of {len(s.layers)} layers "
            f"({', '.join(layers)}), {n_sub} of {n_all} candidates, {len(s.x)} calibration "
            f"images, batch 256, BN recalibration on {256} images when on.\n\n"
            + _common.table(
                [
                    "bn_recal",
                    "cone s",
                    "naive s",
                    "naive/cone",
                    "naive all layers, min (extrap.)",
                    "max diff rel_error",
                    "loss",
                    "kl",
                    "top1 (pts)",
                    "agreement (pts)",
                ],
                rows,
            )
            + "\n\nPer layer (seconds; the first layer also carries the call's setup: dense "
            "pass, tracing):\n\n"
            + _common.table(["layer", "cands", "bn_recal", "cone", "naive", "ratio"], per_layer)
        )
    body = "\n\n".join(out)
    return body, summary


def run_cone_freeing(self, env, name, module):
    """``ConeRunner.run_cone`` that drops each cone value after its last use in the cone.

    Benchmark-only: patched onto the class for part ``free`` (the library is not modified).
    """
    nodes = self.cone(name)
    key = ("dead-after", name)
    if key not in self._cones:
        inside, last = set(nodes), {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                if a in inside:
                    last[a] = i
        self._cones[key] = [[a for a, j in last.items() if j == i] for i in range(len(nodes))]
    local = dict(env)
    with swapped(self.gm, name, module):
        for n, dead in zip(nodes, self._cones[key]):
            self._run([n], local)
            for a in dead:
                del local[a]
    return self.output(local)


def part_free(args) -> str:
    """Cone path as shipped vs with cone values freed after last use vs naive (bn_recal off)."""
    s = setup(R20, args.calib)
    layers = s.layers[args.offset :: args.stride] if not args.quick else s.layers[1:3]
    sensitivity(s.model, s.inv, s.space, s.x[:64], s.y[:64], bn_recal=False,
                layers=layers[:1], progress=False)  # fmt: skip
    shipped, res = ConeRunner.run_cone, {}
    try:
        for label in ("cone", "cone, freeing", "naive"):
            ConeRunner.run_cone = run_cone_freeing if label == "cone, freeing" else shipped
            res[label] = timed_table(s, layers, False, label == "naive")
            log(f"  free: {label}: {res[label][0]:.1f} s")
    finally:
        ConeRunner.run_cone = shipped
    diff = max_abs_diff(res["cone, freeing"][1].df, res["naive"][1].df)
    naive = res["naive"][0]
    rows = [[k, f"{v[0]:.1f}", f"{naive / v[0]:.2f}x"] + [f"{v[2][la]:.1f}" for la in layers]
            for k, v in res.items()]  # fmt: skip
    return (
        f"cifar_resnet20, the same {len(layers)} layers as the speed section, {len(s.x)} "
        "images, bn_recal off. `cone, freeing` patches `ConeRunner.run_cone` (in this process "
        "only) to delete each value computed inside the cone once its last consumer in the "
        "cone has run, so a candidate no longer keeps the whole cone's activations alive; "
        "the table it gives vs naive: max |diff| "
        + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
        + ".\n\n"
        + _common.table(["path", "total s", "naive / path", *layers], rows)
    )


# --------------------------------------------------------------------------- tables


def get_table(s, bn_recal: bool, args) -> SensitivityTable:
    """The full cone table: the CLI's when it matches, else computed (cached in scratch)."""
    cli = Path(args.cli_out)
    if not args.quick and bn_recal is False and (cli / "sensitivity.json").is_file():
        t = SensitivityTable.load(cli)
        if (
            t.meta.get("bn_recal") is False
            and t.meta.get("n") == len(s.x)
            and t.meta.get("layers") == s.layers
        ):
            log(f"table bn_recal={bn_recal}: the CLI's ({cli})")
            return t
    layers = None if not args.quick else s.layers[:2]
    log(f"table bn_recal={bn_recal}: computing (cached in {args.scratch})")
    return sensitivity(
        s.model,
        s.inv,
        s.space,
        s.x,
        s.y,
        bn_recal=bn_recal,
        layers=layers,
        out_dir=Path(args.scratch) / f"table-{s.name}-recal{int(bn_recal)}",
        progress=True,
    )


# --------------------------------------------------------------------------- signals


def compress_one(s, row):
    spec = spec_from_row(row)
    return ah.apply(
        s.model, ah.Allocation.for_inventory(s.inv, {row["layer"]: spec}), s.inv, progress=False
    ).eval()


def downstream_bns(s, layer: str) -> list[str]:
    if not hasattr(s, "runner"):
        s.runner = ConeRunner(s.model)
    return [
        n.target
        for n in s.runner.cone(layer)
        if n.op == "call_module" and isinstance(s.model.get_submodule(n.target), _BatchNorm)
    ]


@torch.no_grad()
def recal_downstream(s, model, layer: str, n: int = 256, batch_size: int = 256):
    """Re-estimate the BatchNorms downstream of ``layer`` on the first ``n`` calibration
    images, as ``sensitivity(bn_recal=True)`` does."""
    bns = [model.get_submodule(t) for t in downstream_bns(s, layer)]
    with estimating(bns):  # the package's one BatchNorm re-estimate
        for i in range(0, n, batch_size):
            model(s.x[i : min(n, i + batch_size)])
    return model


def pick_pairs(table: SensitivityTable, idx: list[int]) -> pd.DataFrame:
    parts = []
    for _, g in table.df.groupby("layer", sort=False):
        parts.append(g.iloc[[i for i in idx if i < len(g)]])
    return pd.concat(parts, ignore_index=True)


def spearman_block(df: pd.DataFrame, drop_col: str, seed: int = 0) -> tuple[str, dict]:
    import warnings

    from scipy.stats import spearmanr

    warnings.filterwarnings("ignore", message=".*constant.*")
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(df), size=(2000, len(df)))
    rows, rhos, boots = [], {}, {}
    d = df[drop_col].to_numpy(float)
    for sig, (col, sign) in SIGNALS.items():
        v = sign * df[col].to_numpy(float)
        rho, p = spearmanr(v, d)
        boots[sig] = np.array([spearmanr(v[b], d[b])[0] for b in boot])
        lo, hi = np.nanpercentile(boots[sig], [2.5, 97.5])
        rhos[sig] = rho
        rows.append([sig, sign, rho, lo, hi, p])
    best = max(rhos, key=rhos.get)
    out = []
    for sig, sign, rho, lo, hi, p in sorted(rows, key=lambda r: -r[2]):
        # paired bootstrap (the same resampled pairs) of rho(best) - rho(signal)
        gap = ""
        if sig != best:
            g_lo, g_hi = np.nanpercentile(boots[best] - boots[sig], [2.5, 97.5])
            gap = f"[{g_lo:+.3f}, {g_hi:+.3f}]"
        name = sig if sign > 0 else f"-{sig}"
        out.append([name, f"{rho:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{p:.1e}", gap])
    header = ["signal", "Spearman rho", "bootstrap 95% CI", "p", f"rho({best}) - rho, 95% CI"]
    return _common.table(header, out), rhos


def part_signals(args, s, state) -> str:
    test = Subset(s.data.test, range(min(args.test_images, len(s.data.test))))
    dense = evaluate(s.model, test, progress=False)
    state["test"], state["dense_test"] = test, dense
    log(f"dense test top-1 on {len(test)} images: {dense['top1']:.2f}")
    idx = [int(i) for i in args.cands.split(",")]
    body = [
        f"Dense cifar_resnet20 on the first {len(test)} test images: top-1 "
        f"{dense['top1']:.2f} %. Candidate positions per layer (in the space's order "
        f"sparse 0.5/0.7/0.85/0.95, tucker2 0.75/0.5/0.35/0.2 of full rank, lowrank+sparse "
        f"(0.35, 0.9)/(0.35, 0.97)/(0.15, 0.9)/(0.15, 0.97)): {idx}. Signals are signed so "
        "that larger means more damage (`-dtop1`). Dense top-1 on the calibration images: "
        f"{get_table(s, False, args).meta['dense']['top1']:.2f} % (the checkpoint was trained "
        "on them), so there top-1 equals agreement and -dtop1 and disagreement are the same "
        "number. The last column is a paired bootstrap (same resampled pairs) of the gap to "
        "the best signal: an interval that contains 0 means no detectable difference."
    ]
    variants = [False, True] if args.signals_recal else [False]
    for bn_recal in variants:
        table = get_table(s, bn_recal, args)
        pairs = pick_pairs(table, idx if not args.quick else idx[:2])
        saved = Path(args.scratch) / f"signals-recal{int(bn_recal)}.csv"
        reused = reuse_drops(saved, pairs, len(test)) if args.reuse_drops else None
        drops = list(reused) if reused is not None else []
        t0 = time.perf_counter()
        for i, row in pairs.iterrows():
            if reused is not None:
                break
            m = compress_one(s, row)
            if bn_recal:
                recal_downstream(s, m, row["layer"])
            r = evaluate(m, test, progress=False)
            drops.append(dense["top1"] - r["top1"])
            if i % 10 == 0:
                log(
                    f"  [{i + 1}/{len(pairs)}] {row['layer']} {row['method']} {row['rank']} "
                    f"{row['sparsity']}: test drop {drops[-1]:.2f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
        pairs["test_drop"] = drops
        if reused is None:
            pairs.assign(test_images=len(test)).to_csv(saved, index=False)
        else:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(saved.stat().st_mtime))
            log(f"  test drops reused from {saved}")
            body.append(
                f"(Test drops reused from `{saved}`, written {when} by an earlier run of this "
                "script with the same options: `--reuse-drops`.)"
            )
        state[f"pairs{int(bn_recal)}"] = pairs
        tab, rhos = spearman_block(pairs, "test_drop")
        best = max(rhos, key=rhos.get)
        log(f"  bn_recal={bn_recal}: {rhos}; best {best}")
        # Beyond the brief: how well each signal ranks candidates *within* a layer.
        within = {
            sig: np.nanmean([_spear(g[c] * sg, g["test_drop"]) for _, g in pairs.groupby("layer")])
            for sig, (c, sg) in SIGNALS.items()
        }
        mild = pairs[pairs.test_drop <= 3]
        mild_rho = {s: _spear(mild[c] * sg, mild["test_drop"]) for s, (c, sg) in SIGNALS.items()}
        body.append(
            f"### bn_recal={'on' if bn_recal else 'off'}: {len(pairs)} (layer, candidate) "
            f"pairs, test drops {min(drops):.2f} .. {max(drops):.2f} points (median "
            f"{np.median(drops):.2f})\n\n" + tab + f"\n\nBest: **{best}**. Mean within-layer "
            "Spearman (each layer's pairs ranked on their own): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(within.items(), key=lambda kv: -kv[1]))
            + f". Mild pairs only (test drop <= 3 points, {len(mild)} pairs, where a search "
            "actually chooses): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(mild_rho.items(), key=lambda kv: -kv[1]))
            + "."
        )
        state["signal_rhos" + str(int(bn_recal))] = rhos
    return "\n\n".join(body)


def reuse_drops(path: Path, pairs: pd.DataFrame, n_test: int) -> list[float] | None:
    """Test drops saved by an earlier run for exactly these pairs and test images, else None."""
    if not path.is_file():
        return None
    old = pd.read_csv(path, keep_default_na=False)
    same = (
        len(old) == len(pairs)
        and "test_images" in old
        and (old["test_images"] == n_test).all()
        and all((old[c].astype(str).values == pairs[c].astype(str).values).all() for c in KEY_COLS)
    )
    return old["test_drop"].tolist() if same else None


def _spear(a, b):
    from scipy.stats import spearmanr

    return spearmanr(np.asarray(a, float), np.asarray(b, float))[0]


# --------------------------------------------------------------------------- BN recal


def augmented_calibration(s, seed: int = 0) -> TensorDataset:
    """The calibration images with training augmentation: zero-pad 4, random 32 crop, flip."""
    g = torch.Generator().manual_seed(seed)
    base = s.calib.dataset
    raw = base.images[torch.as_tensor(s.calib.indices)]
    padded = F.pad(raw, (4, 4, 4, 4))
    out = torch.empty_like(raw)
    for i in range(len(raw)):
        dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
        crop = padded[i, :, dy : dy + 32, dx : dx + 32]
        out[i] = crop.flip(-1) if torch.rand(1, generator=g) < 0.5 else crop
    return TensorDataset(base.preprocess(out), torch.zeros(len(out)))


def part_bn(args, s, state) -> str:
    test, dense = state["test"], state["dense_test"]
    pairs = state["pairs0"].sort_values("test_drop", ascending=False).head(args.severe)
    rows = []
    for _, row in pairs.iterrows():
        m = compress_one(s, row)
        full = recalibrate_bn(compress_one(s, row), s.calib, batches=None, progress=False)
        down = recal_downstream(s, m, row["layer"])
        acc_full = evaluate(full, test, progress=False)["top1"]
        acc_down = evaluate(down, test, progress=False)["top1"]
        acc_none = dense["top1"] - row["test_drop"]
        log(
            f"  {row['layer']} {row['method']} {row['rank']} {row['sparsity']}: none "
            f"{acc_none:.2f}, full recal {acc_full:.2f}, downstream recal {acc_down:.2f}"
        )
        rows.append(
            [
                row["layer"],
                _cand(row),
                f"{acc_none:.2f}",
                f"{acc_full:.2f}",
                f"{acc_full - acc_none:+.2f}",
                f"{acc_down:.2f}",
                f"{acc_down - acc_none:+.2f}",
            ]
        )
    d_clean = recalibrate_bn(compress_none(s), s.calib, batches=None, progress=False)
    d_aug = recalibrate_bn(
        compress_none(s), augmented_calibration(s), batches=None, progress=False
    )
    acc_clean = evaluate(d_clean, test, progress=False)["top1"]
    acc_aug = evaluate(d_aug, test, progress=False)["top1"]
    log(f"  dense {dense['top1']:.2f}; recal clean {acc_clean:.2f}; recal augmented {acc_aug:.2f}")
    auto = []
    for name in args.models:
        t = s if name == s.name else setup(name, args.calib)
        table = sensitivity(
            t.model,
            t.inv,
            t.space,
            t.x,
            t.y,
            bn_recal="auto",
            layers=t.layers[-1:],
            progress=False,
        )
        chk = table.meta["bn_recal_check"]
        auto.append(
            [
                name,
                f"{chk['kl']:.4f}",
                f"{chk['agreement']:.2f}",
                chk["batchnorms"],
                "on" if table.meta["bn_recal"] else "off",
            ]
        )
        log(f"  auto {name}: {chk} -> {table.meta['bn_recal']}")
    return (
        f"Test top-1 (%) on the first {len(test)} test images of the {len(pairs)} pairs with "
        f"the largest test drop (no recalibration). Full: `recalibrate_bn` of every BatchNorm "
        f"of the compressed model on the {len(s.x)} calibration images (clean train images, "
        f"all batches). Downstream: only the BatchNorms after the compressed layer, on the "
        f"first 256 calibration images (what `sensitivity(bn_recal=True)` scores).\n\n"
        + _common.table(
            ["layer", "candidate", "no recal", "full recal", "gain", "downstream recal", "gain"],
            rows,
        )
        + f"\n\nDense model: {dense['top1']:.2f} %; after `recalibrate_bn` on the same "
        f"{len(s.x)} clean calibration images {acc_clean:.2f} % ({acc_clean - dense['top1']:+.2f}"
        f"); on the same images with training augmentation (pad-4 random crop + flip) "
        f"{acc_aug:.2f} % ({acc_aug - dense['top1']:+.2f}).\n\n"
        '`bn_recal="auto"` (dense-only recalibration on 256 calibration images; on when its '
        "KL <= 0.01):\n\n"
        + _common.table(
            ["model", "KL of dense recal", "agreement %", "BatchNorms", "decision"], auto
        )
    )


def compress_none(s):
    import copy

    return copy.deepcopy(s.model)


def _cand(row) -> str:
    if row["method"] == "sparse":
        return f"sparse {row['sparsity']}"
    if row["method"] == "lowrank+sparse":
        return f"{row['factorization']} r{row['rank']} + sparse {row['sparsity']}"
    return f"{row['method']} r{row['rank']}"


# --------------------------------------------------------------------------- ordering


def chains(g: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Sequences of rows from mild to severe within one layer."""
    g = g.assign(
        rank_size=[np.prod([int(v) for v in str(r).split("x") if v] or [0]) for r in g["rank"]]
    )
    out = [("sparse, sparsity up", g[g.method == "sparse"].sort_values("sparsity"))]
    for method in sorted(set(g.method) - {"sparse", "lowrank+sparse"}):
        out.append(
            (
                f"{method}, rank down",
                g[g.method == method].sort_values("rank_size", ascending=False),
            )
        )
    hyb = g[g.method == "lowrank+sparse"]
    for r, h in hyb.groupby("rank", sort=False):
        out.append((f"L+S r{r}, sparsity up", h.sort_values("sparsity")))
    for sp, h in hyb.groupby("sparsity"):
        out.append((f"L+S s{sp}, rank down", h.sort_values("rank_size", ascending=False)))
    return [(k, c) for k, c in out if len(c) > 1]


@torch.no_grad()
def per_image(s, row, ref_logp) -> dict[str, np.ndarray]:
    m = compress_one(s, row)
    logits = torch.cat([m(s.x[i : i + 256]) for i in range(0, len(s.x), 256)])
    logp = F.log_softmax(logits, 1)
    return {
        "loss": F.nll_loss(logp, s.y, reduction="none").numpy(),
        "kl": (ref_logp.exp() * (ref_logp - logp)).sum(1).numpy(),
    }


def part_order(args, s, state) -> str:
    table = get_table(s, False, args)
    with torch.no_grad():
        ref = torch.cat([s.model(s.x[i : i + 256]) for i in range(0, len(s.x), 256)])
    ref_logp = F.log_softmax(ref, 1)
    cache: dict = {}

    def images(row):
        key = tuple(str(row[c]) for c in KEY_COLS)
        if key not in cache:
            cache[key] = per_image(s, row, ref_logp)
            check = max(
                abs(cache[key]["loss"].mean() - row["loss"]),
                abs(cache[key]["kl"].mean() - row["kl"]),
            )
            state["order_check"] = max(state.get("order_check", 0.0), check)
        return cache[key]

    rows, n_steps, rel_inv = [], 0, []
    for layer, g in table.df.groupby("layer", sort=False):
        for chain, c in chains(g):
            recs = c.to_dict("records")
            for mild, severe in zip(recs, recs[1:]):
                n_steps += 1
                if severe["rel_error"] < mild["rel_error"]:
                    rel_inv.append((layer, chain, _cand(mild), _cand(severe)))
                for sig, col in (("kl", "kl"), ("dloss", "loss")):
                    delta = mild[col] - severe[col]
                    if delta <= 0:
                        continue
                    a, b = images(mild)[col], images(severe)[col]
                    se = float(np.std(a - b, ddof=1) / np.sqrt(len(a)))
                    z = delta / se if se > 0 else float("inf")
                    rows.append(
                        [
                            layer,
                            chain,
                            f"{_cand(mild)} -> {_cand(severe)}",
                            sig,
                            f"{mild[sig]:.4f}",
                            f"{severe[sig]:.4f}",
                            f"{delta:.4f}",
                            f"{se:.4f}",
                            f"{z:.1f}",
                            "**yes**" if z > 2 else "no",
                        ]
                    )
    beyond = sum(r[-1] != "no" for r in rows)
    log(
        f"  order: {n_steps} steps, {len(rows)} inversions ({beyond} beyond 2 SE); "
        f"rel_error inversions {len(rel_inv)}; per-image check {state.get('order_check')}"
    )
    text = (
        f"{n_steps} mild -> severe steps in {table.df.layer.nunique()} layers (consecutive "
        "candidates of one chain: sparse by sparsity; tucker2 by rank; lowrank+sparse by "
        "sparsity at each rank and by rank at each sparsity), each checked for kl and dloss: "
        f"**{len(rows)} inversions** (the severer candidate scores better), "
        f"**{beyond} beyond 2 paired SE**. SE: standard error of the mean per-image "
        f"difference over the {len(s.x)} calibration images, recomputed through `ah.apply` "
        f"(per-image means reproduce the table to {state.get('order_check', 0):.1e}). "
        f"rel_error inversions: {len(rel_inv)}" + (f" ({rel_inv})" if rel_inv else "") + ".\n\n"
    )
    if rows:
        text += _common.table(
            [
                "layer",
                "chain",
                "step",
                "signal",
                "mild",
                "severe",
                "delta",
                "SE",
                "z",
                "beyond noise",
            ],
            rows,
        )
    return text


# --------------------------------------------------------------------------- CLI


def cli_cmd(out: Path, args) -> list[str]:
    cmd = [
        str(_common.ROOT / ".venv/bin/autohybrid"),
        "sensitivity",
        "--model",
        R20,
        "--checkpoint",
        CHECKPOINTS[R20],
        "--data",
        DATA,
        "--out",
        str(out),
    ]
    if args.quick:
        cmd += [
            "--calib",
            "128",
            "--layers",
            "layer1.0.conv1",
            "layer2.0.conv1",
            "layer3.0.conv1",
            "layer3.2.conv2",
        ]
    return cmd


def run_cli(cmd, kill_when=None):
    """(seconds, returncode, stdout, stderr); ``kill_when()`` true -> SIGKILL the process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_when is None:
        so, se = p.communicate()
        return time.perf_counter() - t0, p.returncode, so, se
    import threading

    buf = {"out": "", "err": ""}

    def pump(stream, key):
        for chunk in iter(lambda: stream.read(256), ""):
            buf[key] += chunk

    threads = [
        threading.Thread(target=pump, args=(p.stdout, "out")),
        threading.Thread(target=pump, args=(p.stderr, "err")),
    ]
    for t in threads:
        t.start()
    while p.poll() is None:
        if kill_when():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    p.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, p.returncode, buf["out"], buf["err"]


def bar_counts(stderr: str) -> str:
    """The distinct counts the progress bar showed, in order (``0/216 -> 72/216 -> ...``)."""
    seen: list[str] = []
    for c in re.findall(r"sensitivity:\s*\d+%\|[^|]*\|\s*(\d+/\d+)", stderr):
        if not seen or seen[-1] != c:
            seen.append(c)
    return " -> ".join(seen[:4] + (["...", seen[-1]] if len(seen) > 4 else [])) or "?"


def part_cli(args) -> str:
    scratch = Path(args.scratch)
    fresh, killed = Path(args.cli_out), Path(args.cli_out + "_killed")
    for d in (fresh, killed):
        shutil.rmtree(d, ignore_errors=True)
    cmd = cli_cmd(fresh, args)
    log("cli: fresh run")
    t_a, rc_a, out_a, err_a = run_cli(cmd)
    log(f"  {t_a:.1f} s rc {rc_a}: {out_a.strip()}")
    t_b, rc_b, out_b, _ = run_cli(cmd)
    log(f"  rerun {t_b:.1f} s rc {rc_b}: {out_b.strip()}")
    cached = "served from cache" in out_b

    kill_after = 2 if args.quick else args.kill_after

    def partial_layers() -> int:
        for f in killed.glob(".sensitivity-*.partial.csv"):
            try:
                return pd.read_csv(f, keep_default_na=False).layer.nunique()
            except Exception:  # being replaced
                return 0
        return 0

    cmd_k = cli_cmd(killed, args)
    t_c, rc_c, _, err_c = run_cli(cmd_k, kill_when=lambda: partial_layers() >= kill_after)
    done = partial_layers()
    partial = sorted(f.name for f in killed.glob(".sensitivity-*.partial.csv"))
    log(f"  killed after {t_c:.1f} s rc {rc_c}, partial {partial} with {done} layers")
    t_d, rc_d, out_d, err_d = run_cli(cmd_k)
    start = bar_counts(err_d)
    left = sorted(f.name for f in killed.glob(".sensitivity-*.partial.csv"))
    a = SensitivityTable.load(fresh)
    d = SensitivityTable.load(killed)
    diff = max_abs_diff(a.df, d.df)
    log(
        f"  resumed {t_d:.1f} s rc {rc_d}, bar {start}, partial left {left}, "
        f"max diff vs fresh {diff}: {out_d.strip()}"
    )
    (scratch / "cli_resume_stderr.txt").write_text(err_d)
    env = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    shown = " ".join(shlex.quote(c) for c in [".venv/bin/autohybrid", *cmd[1:]])
    return (
        f"Command (env `{env}`, set from `--threads`): `{shown}` (the "
        f"benchmark's folders: `{fresh}` and, for the kill test, `{killed}`).\n\n"
        + _common.table(
            ["run", "wall s", "exit", "what it printed / did"],
            [
                [
                    "fresh",
                    f"{t_a:.1f}",
                    rc_a,
                    out_a.strip().splitlines()[0] if out_a else err_a[-200:],
                ],
                [
                    "same command again",
                    f"{t_b:.1f}",
                    rc_b,
                    (out_b.strip().splitlines()[0] if out_b else "")
                    + (" (cache: yes)" if cached else " (**cache: NO**)"),
                ],
                [
                    "fresh folder, SIGKILL",
                    f"{t_c:.1f}",
                    rc_c,
                    f"killed once the partial CSV held {done} layers ({', '.join(partial)})",
                ],
                [
                    "rerun after the kill",
                    f"{t_d:.1f}",
                    rc_d,
                    f"progress bar shows {start}; {out_d.strip().splitlines()[0] if out_d else ''}"
                    f"; partial file left: {left or 'none'}",
                ],
            ],
            align="lrrl",
        )
        + "\n\nResumed table vs uninterrupted table: same rows, max |diff| "
        + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
        + f". Fresh run's own engine time (meta `seconds`): {a.meta['seconds']:.1f} s; resumed "
        f"run's: {d.meta['seconds']:.1f} s. BN recalibration: {a.meta['bn_recal']} "
        f"(auto check {a.meta.get('bn_recal_check')})."
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, prints only")
    ap.add_argument("--write", action="store_true", help="write RESULTS even with --quick")
    ap.add_argument("--parts", default="cli,speed,free,signals,bn,order")
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    ap.add_argument("--calib", type=int, default=1024, help="calibration images")
    ap.add_argument("--stride", type=int, default=3, help="speed: every n-th layer")
    ap.add_argument("--offset", type=int, default=1, help="speed: first layer index")
    ap.add_argument(
        "--cands",
        default="1,3,5,7,8",
        help="signals: candidate positions per layer (0-based, space order)",
    )
    ap.add_argument("--test-images", type=int, default=2500)
    ap.add_argument(
        "--reuse-drops",
        action="store_true",
        help="signals: reuse the test drops saved in --scratch for the same pairs",
    )
    ap.add_argument(
        "--signals-recal",
        action="store_true",
        help="signals: also against the bn_recal=True table",
    )
    ap.add_argument("--severe", type=int, default=10, help="bn: how many severe pairs")
    ap.add_argument("--kill-after", type=int, default=6, help="cli: layers before SIGKILL")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    ap.add_argument("--scratch", default="/tmp/sensitivity_bench")
    ap.add_argument(
        "--cli-out",
        default="/tmp/sens_r20",
        help="cli: output folder (emptied first); the kill test uses <it>_killed",
    )
    args = ap.parse_args()
    os.chdir(_common.ROOT)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the CLI subprocesses
    torch.set_num_threads(args.threads)
    if args.quick:
        args.calib, args.test_images, args.severe = 128, 256, 2
        args.scratch, args.cli_out = args.scratch + "_quick", args.cli_out + "_quick"
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    write = args.write or not args.quick
    if write and not RESULTS.exists():
        RESULTS.write_text(HEAD)
    t_start = time.perf_counter()
    log(f"machine: {_common.machine()}; torch threads {torch.get_num_threads()}")
    state: dict = {}
    t_part, load0 = time.perf_counter(), _common.load_average()

    def done(title, body):
        nonlocal t_part, load0
        prov = _common.provenance(time.perf_counter() - t_part, (load0, _common.load_average()))
        prov += f"\n- torch threads: {torch.get_num_threads()}"
        t_part, load0 = time.perf_counter(), _common.load_average()
        print(f"\n## {title}\n\n{body}\n", flush=True)
        if write:
            _common.write_section(title, prov + "\n\n" + body, RESULTS)

    if "cli" in parts:
        done("CLI acceptance: cache and resume after SIGKILL", part_cli(args))
    if "speed" in parts:
        body, summary = part_speed(args)
        done("Speed: cached cone vs naive full forward", body)
    if "free" in parts:
        done("Speed: freeing cone values after last use (cifar_resnet20)", part_free(args))
    if {"signals", "bn", "order"} & set(parts):
        s = setup(R20, args.calib)
    if "signals" in parts or "bn" in parts:
        done(
            "Which calibration signal predicts the test drop (cifar_resnet20)",
            part_signals(args, s, state),
        )
    if "bn" in parts:
        done("BatchNorm recalibration (cifar_resnet20)", part_bn(args, s, state))
    if "order" in parts:
        done("Ordering sanity (cifar_resnet20, bn_recal off)", part_order(args, s, state))
    log(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
