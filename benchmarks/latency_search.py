"""The latency budget end to end: ``autohybrid search --metric latency`` on the shared CIFAR-10
checkpoints, against a low-rank-only search, uniform low-rank and Torch-Pruning at the same
measured latency, each with the same fine-tune.

For each model and latency budget (at ``--batch`` 1 or 64, one thread, torch eager on CPU):

- **searched**: the user's command, run as a subprocess (``autohybrid search --metric latency
  --budget B --threads 1 --latency-batch N``, defaults otherwise: data fit, 40 trials, the
  selection ladder's default fine-tune budget); the returned model as its ``pareto.csv`` row
  reports it: the latency the table predicted, the latency measured from its files in a fresh
  process (``autohybrid.latency.measure_export``, at batch 1 and 64), params, top-1 on the
  full 10,000-image test split before and after its fine-tune.
- **lowrank**: the same search over a low-rank-only space (the model's space with its sparse
  and L+S methods removed).
- **uniform** low-rank: one keep level for every layer on the table's prediction
  (``benchmarks/latency.py``'s ``uniform_lowrank``, with ``peers_latency.py``'s measured
  correction), fitted to data on the same 1024 calibration images (``data.splits(1024,
  1000, seed=0)``, the search's), deployed in the table's fastest forms, timed the same way,
  then fine-tuned with the recipe and the number of steps the searched model's own fine-tune
  had (``SearchConfig.finetune_recipe()``), on the same fine-tune split.
- **tp**: Torch-Pruning channel pruning (``peers_latency.tp_prune``: magnitude importance, one
  ratio per group) at the least ratio of a bisection whose measured latency is within the
  budget, fine-tuned like the uniform row. Needs ``torch-pruning`` in the benchmark's venv
  (``pip install torch-pruning`` beside autohybrid; never a package dependency).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_search.py \
        --models vit_tiny_patch16_224 --budgets 0.7 0.5 --batch 64 --rows searched uniform
    OMP_NUM_THREADS=1 tp-venv/bin/python benchmarks/latency_search.py \
        --models vit_tiny_patch16_224 --budgets 0.7 --rows tp

Rows accumulate in ``benchmarks/results/latency_search.json`` (a rerun of a model, budget,
batch and row replaces that row; two runs at once merge their rows); the section "Searched at
a latency budget" of ``benchmarks/RESULTS_latency.md`` is rewritten from it after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common  # first: records the caller's thread settings
import pandas as pd
import torch
import yaml
from latency import MODELS, SIZES  # benchmarks/latency.py
from peers_latency import ah_at, top1, tp_at  # benchmarks/peers_latency.py

from autohybrid.config import SearchConfig
from autohybrid.data import as_tensors, load_data
from autohybrid.finetune import FinetuneConfig, finetune
from autohybrid.inventory import inventory
from autohybrid.latency import measure_table
from autohybrid.methods import HYBRID, METHODS
from autohybrid.models import create_model
from autohybrid.search_space import load_search_space

DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
OUT = _common.BENCH_DIR / "out" / "latency_search"
ROWS = _common.BENCH_DIR / "results" / "latency_search.json"
TABLES = _common.BENCH_DIR / "results" / "latency"
RESULTS = _common.BENCH_DIR / "RESULTS_latency.md"
TITLE = "Searched at a latency budget"
BUDGETS = (0.7, 0.5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lowrank_space(name: str, folder: Path) -> Path:
    """The model's search space without its sparse and L+S methods, as a YAML file."""
    space = load_search_space(name)
    methods = {k: [m for m in v if METHODS[m].lowrank and m != HYBRID]
               for k, v in space.methods.items()}
    d = space.to_dict()
    d.update(name=f"{space.name}-lowrank", methods={k: v for k, v in methods.items() if v})
    path = folder / "lowrank-space.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def searched(name: str, budget: float, space: str, extra: list[str], batch: int = 1) -> dict:
    out = OUT / (f"{name}-{budget:g}-{space}" + (f"-b{batch}" if batch != 1 else ""))
    cmd = [sys.executable, "-m", "autohybrid", "search", "--model", name,
           "--checkpoint", str(MODELS[name]), "--data", DATA, "--metric", "latency",
           "--budget", str(budget), "--threads", "1", "--latency-batch", str(batch),
           "--out", str(out), *extra]
    if name in SIZES:
        cmd += ["--input-size", *map(str, SIZES[name])]
    if space == "lowrank":
        cmd += ["--search-space", str(lowrank_space(name, out.parent / f"{name}-spaces"))]
    cache = OUT / "cache"
    (cache / "latency").mkdir(parents=True, exist_ok=True)
    for f in (TABLES / name).glob("latency-*.json"):  # benchmarks/latency.py's tables: the
        shutil.copy(f, cache / "latency" / f.name)  # same key, the same file name
    env = {**os.environ, "AUTOHYBRID_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    log(" ".join(cmd))
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "..").resolve().mkdir(parents=True, exist_ok=True)
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        return {"unreachable": tail[0] if tail else f"exit {proc.returncode}"}
    front = pd.read_csv(out / "pareto.csv")
    won = front[front.returned].iloc[0].to_dict()
    done = [int(k.rsplit("_", 1)[1]) for k, v in won.items()
            if k.startswith("val_top1_step_") and v == v]
    won["finetune_steps"] = max(done, default=0)
    won["seconds"] = time.time() - t
    won["out"] = str(out.relative_to(_common.BENCH_DIR.parent))
    return won


def tuned(small, model, data, splits, steps: int, seed: int) -> dict:
    """``small`` before and after the search's fine-tune recipe for ``steps`` steps."""
    before = top1(small, data.test)
    cfg = SearchConfig(seed=seed)
    ft = FinetuneConfig(**{**cfg.finetune_recipe(), "steps": steps,
                           "flip": data.mirror_invariant})
    t = time.time()
    finetune(small, model, splits.finetune, ft, progress=False)
    after = top1(small, data.test)
    params = sum(p.numel() for p in small.parameters()) / sum(
        p.numel() for p in model.parameters())
    return {"params": params, "before": before, "after": after, "ft_s": time.time() - t,
            "dense": top1(copy.deepcopy(model), data.test)}


def uniform(name: str, budget: float, steps: int, seed: int, batch: int = 1) -> dict:
    model = create_model(name, checkpoint=MODELS[name]).eval()
    size = SIZES.get(name, (3, 32, 32))
    inv = inventory(model, size)
    space = load_search_space(name).for_latency()
    table = measure_table(model, inv, space, threads=1, batch=batch, folder=TABLES / name,
                          probe=budget, progress=False)
    data = load_data(DATA, model, input_size=size)
    splits = data.splits(1024, 1000, seed=seed)
    x_calib, _ = as_tensors(splits.calibration)
    got = ah_at(model, inv, space, table, budget, x_calib, size=size, batch=batch)
    if "unreachable" in got:
        return got
    return {"latency": got["latency"], "predicted": got["predicted"], "level": got["level"],
            "fit_s": got["fit_s"], **tuned(got["model"], model, data, splits, steps, seed)}


def pruned(name: str, budget: float, steps: int, seed: int, batch: int = 1) -> dict:
    """Torch-Pruning (``peers_latency.tp_prune``) at the least ratio whose measured latency
    is within the budget, fine-tuned like the uniform row. Needs ``torch-pruning`` in the
    benchmark's environment (never a package dependency)."""
    model = create_model(name, checkpoint=MODELS[name]).eval()
    size = SIZES.get(name, (3, 32, 32))
    got = tp_at(model, budget, size=size, batch=batch)
    if got["ratio"] is None:
        return {"unreachable": f"Torch-Pruning at ratio 0.95 measures {got['tried'][0][1]} "
                               "of the dense latency"}
    data = load_data(DATA, model, input_size=size)
    splits = data.splits(1024, 1000, seed=seed)
    return {"latency": got["latency"], "ratio": got["ratio"], "tried": got["tried"],
            **tuned(got["model"], model, data, splits, steps, seed)}


def fmt(v, spec=".3f") -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def other(r: dict) -> str:
    """The searched model's fresh-process latency at the batch its budget does not name."""
    got = r.get("other_batch")
    return "" if not got else f"{got[1]:.3f} (b{got[0]})"


def key(r: dict) -> tuple:
    """A row's identity in the results file (rows from before ``--batch`` are batch 1)."""
    return r["model"], r["budget"], r.get("batch", 1), r["row"]


def merged(rows: list[dict]) -> list[dict]:
    """``rows`` over the file's current rows: two runs of the script (other models or
    batches, one per core) share the file; a row of this run replaces the file's."""
    mine = {key(r) for r in rows}
    disk = json.loads(ROWS.read_text()) if ROWS.is_file() else []
    return [r for r in disk if key(r) not in mine] + rows


def write(rows: list[dict], t0: float, load0) -> None:
    table = []
    for r in sorted(rows, key=lambda r: (r["model"], r.get("batch", 1), -r["budget"],
                                         r["row"])):
        table.append([r["model"], r.get("batch", 1), r["budget"], r["row"],
                      r.get("unreachable", "") or fmt(r.get("predicted")),
                      fmt(r.get("measured")), other(r),
                      fmt(r.get("error"), "+.1%"), fmt(r.get("params")),
                      fmt(r.get("before"), ".2f"), fmt(r.get("after"), ".2f"),
                      r.get("steps", ""), r.get("methods", "")])
    body = [
        "`autohybrid search --metric latency` (row `searched`: the user's command: data fit, "
        "40 trials, the selection ladder's default fine-tune; row `lowrank`: the same over a "
        "low-rank-only space) against uniform low-rank at the same budget (row `uniform`: one "
        "keep level, data fit on the search's 1024 calibration images, the table's fastest "
        "forms) and Torch-Pruning (row `tp`: channel pruning, magnitude importance, the "
        "least ratio measuring within the budget), the last two fine-tuned with the search's "
        "recipe for as many steps as the searched model's own fine-tune. Latency: at the "
        "budget's batch (1 or 64), one thread, torch eager on CPU, as a fraction of the "
        "dense model's, timed interleaved with it (the searched model from its exported "
        "files in a fresh process, median of 3; other batch: the same model at the other "
        "batch). Predicted: the table's prediction (the search counted it 3 % higher, its "
        "default `--latency-margin`). Error: predicted / measured - 1. Params: over the "
        "dense model's. Top-1 on the full 10,000-image test split; every choice the search "
        "makes is on data held out from the training split.",
        "",
        _common.table(["model", "batch", "budget", "row", "predicted", "measured",
                       "other batch measured", "error", "params",
                       "top-1 before", "top-1 after", "ft steps", "methods"], table),
        "",
        *[f"- {r['model']} batch {r.get('batch', 1)} {r['budget']} {r['row']}: {r['note']}"
          for r in rows
          if r.get("note")],
        f"- Run as `OMP_NUM_THREADS=1 .venv/bin/python {' '.join(sys.argv)}`; rows of "
        "earlier runs are kept (`benchmarks/results/latency_search.json`).",
        "",
        _common.provenance(time.time() - t0, (load0, _common.load_average())),
    ]
    _common.write_section(TITLE, "\n".join(body), RESULTS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--batch", type=int, default=1,
                   help="the batch size the latency budget is measured at (1 or 64)")
    p.add_argument("--rows", nargs="+", default=["searched", "lowrank", "uniform", "tp"],
                   choices=["searched", "lowrank", "uniform", "tp"],
                   help="tp: Torch-Pruning, needs torch-pruning installed beside autohybrid")
    p.add_argument("--steps", type=int, default=None,
                   help="fine-tune steps of the uniform and tp rows (default: as many as the "
                        "searched row's own fine-tune, else 400)")
    p.add_argument("--search-arg", action="append", default=[],
                   help="extra argument for autohybrid search (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.time(), _common.load_average()
    b, rows = args.batch, []
    for name in args.models:
        for budget in args.budgets:
            steps = args.steps
            for which in args.rows:
                row = {"model": name, "budget": budget, "batch": b, "row": which}
                if which in ("searched", "lowrank"):
                    got = searched(name, budget, "full" if which == "searched" else "lowrank",
                                   args.search_arg, b)
                    if "unreachable" in got:
                        row["unreachable"] = got["unreachable"][:240]
                    else:
                        steps = steps or int(got.get("finetune_steps") or 0) or None
                        ob = 64 if b == 1 else 1
                        row.update(
                            predicted=got.get("latency_predicted",
                                              got.get("latency_fraction")),
                            counted=got.get("latency_fraction"),
                            measured=got.get(f"fresh_latency_ratio_b{b}"),
                            other_batch=(ob, got.get(f"fresh_latency_ratio_b{ob}")),
                            error=got.get("prediction_error"),
                            params=got.get("params_fraction"),
                            before=got.get("test_top1_before"),
                            after=got.get("test_top1_after"), steps=got.get("finetune_steps"),
                            methods=got.get("family", ""),
                            note=f"{got['seconds']:.0f} s, output in `{got['out']}`")
                else:
                    if steps is None:
                        prior = [r for r in merged(rows) if r.get("steps") and
                                 key(r) == (name, budget, b, "searched")]
                        steps = int(prior[0]["steps"]) if prior else 400
                    got = (uniform if which == "uniform" else pruned)(name, budget, steps, 0,
                                                                        b)
                    if "unreachable" in got:
                        row["unreachable"] = got["unreachable"][:240]
                    elif which == "uniform":
                        row.update(predicted=got["predicted"], measured=got["latency"],
                                   error=got["predicted"] / got["latency"] - 1,
                                   params=got["params"], before=got["before"],
                                   after=got["after"], steps=steps, methods="lowrank",
                                   note=f"level {got['level']:.3f}, data fit "
                                        f"{got['fit_s']:.0f} s, fine-tune {got['ft_s']:.0f} "
                                        f"s; dense top-1 {got['dense']:.2f}")
                    else:
                        row.update(measured=got["latency"], params=got["params"],
                                   before=got["before"], after=got["after"], steps=steps,
                                   methods="channels",
                                   note=f"Torch-Pruning ratio {got['ratio']:.3f}; bisection "
                                        f"(ratio, measured) {got['tried']}; fine-tune "
                                        f"{got['ft_s']:.0f} s; dense top-1 {got['dense']:.2f}")
                log(f"{name} {budget} b{b} {which}: {row}")
                rows.append(row)
                everything = merged(rows)
                ROWS.parent.mkdir(parents=True, exist_ok=True)
                ROWS.write_text(json.dumps(everything, indent=1, default=float))
                write(everything, t0, load0)


if __name__ == "__main__":
    main()
