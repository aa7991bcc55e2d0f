"""The searched allocations of ``benchmarks/RESULTS_datafit.md``: ``autohybrid search`` with
data-fitted layers, no fine-tuning, on the shared CIFAR-10 checkpoints.

Per model and params budget, three searches through the package's own ``run_search``: the
model family's search space (L+S, sparse and low-rank per layer), and the same space cut to
sparse only and to low-rank only. Each runs as a user would for post-training compression,
``--finetune-budget 0``: the candidate pool (warm starts, one per family, the best near the
budget) refit sequentially and the one with the best top-1 on the validation split (held out
from the train split, never the test split) returned with no fine-tune. Its test top-1 on the
full test split is reported, after the sequential refit and the per-result BatchNorm choice,
as ``pareto.csv`` has it (``test_top1_before``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/datafit_search.py --models cifar_resnet20

Finished cells are stored under ``benchmarks/results/datafit_search/`` and skipped on a rerun;
each cell's study and outputs under ``benchmarks/out/datafit_search/<model>/<family>/params-<b>/``
(cells run side by side do not share files but the model's sensitivity table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _common  # first: records the caller's thread settings
import torch
from _compare_methods import restrict

from autohybrid.config import SearchConfig
from autohybrid.io import atomic_write_text
from autohybrid.search.run import run_search
from autohybrid.search_space import load_search_space

CKPT = _common.SHARED / "models" / "cifar10"
DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
MODELS = {
    "cifar_resnet20": (CKPT / "resnet20-12fca82f.th", [3, 32, 32]),
    "tf_efficientnet_lite0": (CKPT / "efficientnet_lite0-cifar10.pth", [3, 64, 64]),
    "mobilenetv3_small_100": (CKPT / "mobilenetv3_small_100-cifar10.pth", [3, 32, 32]),
    "vit_tiny_patch16_224": (CKPT / "vit_tiny_p8_d6-cifar10.pth", [3, 32, 32]),
    "cifar_resnet56": (CKPT / "resnet56-4bfd9763.th", [3, 32, 32]),
}
FAMILIES = {"ls": None, "sparse": {"sparse"},
            "lowrank": {"svd", "tucker2", "cp", "tt"}}
OUT = _common.BENCH_DIR / "out" / "datafit_search"
RES = _common.BENCH_DIR / "results" / "datafit_search"


@dataclasses.dataclass
class Settings:
    calib: int = 512
    trials: int = 24
    seed: int = 0
    candidates: int = 6  # the pool ranked on validation (0: the front's best calibration KL)
    val: int = 1000


def space_file(model: str, family: str, out: Path) -> str | None:
    """The model's search space cut to ``family``'s methods (``_compare_methods.restrict``),
    written where ``run_search`` can read it; None for the whole space."""
    keep = FAMILIES[family]
    if keep is None:
        return None
    space = dataclasses.replace(restrict(load_search_space(model), frozenset(keep)),
                                name=f"{model}-{family}")
    path = out / f"space-{family}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    space.save(path)
    return str(path)


def run_cell(model: str, family: str, budget: float, s: Settings) -> dict:
    res = RES / model / f"{family}-{budget:g}.json"
    key = dataclasses.asdict(s)
    if res.is_file():
        stored = json.loads(res.read_text())
        if stored.get("settings") == key:
            return stored
    ckpt, size = MODELS[model]
    out = OUT / model / family / f"params-{budget:g}"
    # one sensitivity table per model and family, shared by its budgets (and by cells run
    # side by side once it exists: start one cell of a model first)
    shared = OUT / model / family / "sensitivity"
    shared.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "sensitivity").exists():
        (out / "sensitivity").symlink_to(shared, target_is_directory=True)
    cfg = SearchConfig(model=model, checkpoint=str(ckpt), input_size=size, data=DATA,
                       budget=budget, calib=s.calib, trials=s.trials, seed=s.seed,
                       candidates=s.candidates, val=s.val, finetune_budget=0,
                       study_name=f"{model}-{family}-params-{budget:g}",
                       out=str(out), search_space=space_file(model, family, out))
    t0 = time.time()
    run_search(cfg)
    rows = json.loads((out / "pareto.json").read_text())
    # what the tool returns: the best validation top-1 as fitted (no fine-tune), or without
    # a candidate pool the front's best calibration KL (the front is sorted by it)
    best = next((r for r in rows if r.get("returned")), rows[0])
    result = {"settings": key, "model": model, "family": family, "budget": budget,
              "seconds": round(time.time() - t0, 1), "front": len(rows),
              "chosen": {k: best.get(k) for k in (
                  "trial", "kl", "top1_calibration", "top1_calibration_fitted",
                  "params_fraction", "macs_fraction", "test_top1_before", "bn_recal",
                  "origin", "val_top1_step_0")},
              "best_test_on_front": max(r["test_top1_before"] for r in rows),
              "library": _common.library_fingerprint()}
    res.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res, json.dumps(result, indent=2))
    return result


def table(models: list[str], budgets: list[float]) -> str:
    lines = ["| model | family | " + " | ".join(f"params {b:g}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for model in models:
        for family in FAMILIES:
            cells = []
            for b in budgets:
                p = RES / model / f"{family}-{b:g}.json"
                if not p.is_file():
                    cells.append("not run")
                    continue
                r = json.loads(p.read_text())
                c = r["chosen"]
                bn = "BN recal" if c["bn_recal"] else "BN as is"
                cells.append(f"{c['test_top1_before']:.2f} ({c['origin'].split(':')[0]}, "
                             f"{bn}, {r['seconds']:.0f} s)")
            lines.append(f"| {model} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20"], choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.2, 0.1])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--trials", type=int, default=Settings.trials)
    p.add_argument("--calib", type=int, default=Settings.calib)
    p.add_argument("--report", action="store_true", help="print the table only")
    args = p.parse_args()
    torch.set_num_threads(1)
    s = Settings(calib=args.calib, trials=args.trials)
    if not args.report:
        for model in args.models:
            for b in args.budgets:
                for family in args.families:
                    try:
                        r = run_cell(model, family, b, s)
                    except Exception as e:  # an unreachable cell: say so, go on
                        print(f"{model} {family} {b:g}: {type(e).__name__}: {e}", flush=True)
                        continue
                    print(f"{model} {family} {b:g}: test {r['chosen']['test_top1_before']:.2f}"
                          f" ({r['chosen']['origin']}), {r['seconds']:.0f} s", flush=True)
    print(f"command: `{_common.command_line()}`\n\nmachine: {_common.machine()}\n")
    print(table(args.models, args.budgets))


if __name__ == "__main__":
    main()
