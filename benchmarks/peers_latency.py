"""Torch-Pruning (channel pruning, DepGraph) against autohybrid's uniform low-rank at equal
MEASURED latency on the shared CIFAR-10 ResNet-56, batch 1, one thread, torch eager on CPU.

Both sides are timed the same way: ``autohybrid.latency.measure_model(model, dense, (3, 32,
32), 1, "torch", 1)``, interleaved with the dense model (median of per-round ratios).

- Torch-Pruning: ``MetaPruner`` with ``MagnitudeImportance(p=2)``, ``global_pruning=False``
  (one ratio for every group). Only the channels inside each basic block (``conv1``'s outputs,
  ``conv2``'s inputs) are pruned: the stem, every ``conv2``'s outputs and the linear head are
  ignored, so the residual stream keeps its 16/32/64 channels. The option-A shortcut of these
  checkpoints zero-pads the channels by a fixed count (``F.pad`` in a module of its own),
  which DepGraph cannot re-index: with only the head ignored it cut the stages to 8/24/56
  channels at ratio 0.5 and left the pad as it was, so the residual widths are held fixed.
  The pruning ratio is bisected (the top end checked, then 6 steps in [0, 0.95]) and the least
  pruned candidate whose measured latency ratio is <= the budget is kept.
- autohybrid: ``benchmarks/latency.py``'s ``uniform_lowrank`` (one keep level, searched on the
  cached latency table's prediction), every layer ``fit: data`` on 1024 calibration images
  (``data.splits(1024, 1000, seed=0)``, sequential fit), deployed in the table's fastest forms
  and timed against the dense model. Where the prediction's own budget measures over the
  budget, the predicted budget is lowered by the overshoot (timing a random-valued model of
  the same specs, ``autohybrid.latency.random_model``) until it measures within; the row
  reports the fitted, deployed model's own measurement.
- Both fine-tuned with the same ``FinetuneConfig`` (recipe C of ``RESULTS_finetune.md``: SGD
  0.01 Nesterov, alpha 1.0, BatchNorm frozen, batch 128, seed 0) against the dense teacher on
  the fine-tune split; the teacher's outputs are cached per batch (every run sees the same
  batches). Top-1 on the full 10,000-image test split (channels-last copies: same numbers).

Run from the repository root, in a benchmark venv with Torch-Pruning beside autohybrid
(``python3 -m venv tp && tp/bin/pip install torch==2.14.1 torchvision==0.29.1 && tp/bin/pip
install -e . torch-pruning``; never a package dependency)::

    OMP_NUM_THREADS=1 nice -n 10 tp/bin/python benchmarks/peers_latency.py [--steps 150]
    # redo some rows only, keeping the section's others:
    OMP_NUM_THREADS=1 nice -n 10 tp/bin/python benchmarks/peers_latency.py \
        --budgets 0.5 --methods tp

Every latency is the median of 3 ``measure_model`` calls (``REPEATS``).

Writes the section "Torch-Pruning at equal measured latency (ResNet-56, batch 1)" of
``benchmarks/RESULTS_latency.md`` (rewritten after every stage, so a stopped run keeps what it
measured).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import re
import shlex
import sys
import time

import _common  # first: records the caller's thread settings
import torch
from latency import uniform_lowrank  # benchmarks/latency.py
from torch import nn

import autohybrid as ah
from autohybrid.data import as_tensors, load_data
from autohybrid.deploy import deploy
from autohybrid.evaluate import evaluate
from autohybrid.exceptions import BudgetError
from autohybrid.finetune import FinetuneConfig, finetune
from autohybrid.inventory import inventory
from autohybrid.latency import best_forms, measure_model, measure_table, random_model
from autohybrid.models import create_model
from autohybrid.search_space import load_search_space

NAME = "cifar_resnet56"
CKPT = _common.SHARED / "models" / "cifar10" / "resnet56-4bfd9763.th"
DATA = f"cifar10:{_common.SHARED / 'data' / 'cifar10'}"
SIZE = (3, 32, 32)
BUDGETS = (0.7, 0.5)
TABLE_DIR = _common.BENCH_DIR / "results" / "latency" / NAME
RESULTS = _common.BENCH_DIR / "RESULTS_latency.md"
TITLE = "Torch-Pruning at equal measured latency (ResNet-56, batch 1)"
REPEATS = 3  # measure_model calls per latency, their median
STEPS = 150  # fits the whole run in about an hour on the shared 2-core machine (~3-5 s/step)
RECIPE = dict(batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=True,
              alpha=1.0, bn="frozen", seed=0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fast(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def top1(model: nn.Module, test) -> float:
    return evaluate(fast(model), test, progress=False)["top1"]


def latency(model: nn.Module, dense: nn.Module, repeats: int = REPEATS, size=SIZE,
            batch: int = 1) -> float:
    """The median of ``repeats`` interleaved measurements (load on a shared machine moves
    one measurement by several points)."""
    return measure_model(model, dense, size, batch, "torch", 1, repeats=repeats)["ratio"]


class CachedTeacher(nn.Module):
    """The dense model, its outputs remembered per exact input batch: both students see the
    same augmented batches (order and augmentation are functions of the seed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.cache, self.hits = model, {}, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.model(x)
        key = hashlib.blake2b(x.detach().contiguous().numpy().tobytes(),
                              digest_size=16).hexdigest()
        if key in self.cache:
            self.hits += 1
        else:
            self.cache[key] = self.model(x).detach().float().clone()
        return self.cache[key]


# -- Torch-Pruning ------------------------------------------------------------------------


def tp_prune(dense: nn.Module, ratio: float, size=SIZE) -> nn.Module:
    """``dense`` channel-pruned by Torch-Pruning at ``ratio`` (one ratio for every group).

    - The CIFAR ResNets: the channels inside each basic block (``conv1``'s outputs, ``conv2``'s
      inputs); the residual stream keeps its widths (see the module docstring).
    - timm ViT: DepGraph over the whole net, as Torch-Pruning's own timm ViT example does:
      the embedding width (the residual stream, ``cls_token`` and ``pos_embed`` with it), the
      MLP's hidden width and the attention's head dims (the heads kept,
      ``prune_head_dims``); only the classifier's outputs are kept.
    - timm MobileNetV3 / EfficientNet: DepGraph over the whole net, residual streams and
      squeeze-excite included; only the classifier's outputs are kept.
    """
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    model = copy.deepcopy(dense).eval()
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    kw = {}
    if hasattr(model, "linear") and hasattr(model, "layer1"):  # the CIFAR ResNets
        ignored = [model.conv1, model.linear] + [m for n, m in model.named_modules()
                                                 if n.endswith(".conv2")]
    else:  # timm: the whole net, the classifier's outputs kept
        ignored = [model.get_classifier()]
    if attn:
        kw = dict(num_heads={m.qkv: m.num_heads for m in attn}, prune_head_dims=True,
                  prune_num_heads=False)
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, *size), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False, **kw)
    pruner.step()
    for m in attn:  # the attention's shapes follow its pruned qkv
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim = m.num_heads * m.head_dim
    return model.eval()


def tp_at(dense: nn.Module, budget: float, steps: int = 6, size=SIZE,
          batch: int = 1) -> dict | None:
    """The least pruned candidate of the bisection whose measured ratio is <= budget."""
    lo, hi = 0.0, 0.95
    tried = []
    best = None

    def probe(r):
        nonlocal best
        m = tp_prune(dense, r, size)
        lat = latency(m, dense, size=size, batch=batch)
        tried.append((round(r, 4), round(lat, 3)))
        log(f"  torch-pruning ratio {r:.4f}: measured latency {lat:.3f}")
        if lat <= budget and (best is None or r < best["ratio"]):
            best = {"ratio": r, "latency": lat, "model": m}
        return lat <= budget

    if not probe(hi):
        return {"ratio": None, "tried": tried}
    for _ in range(steps):
        mid = (lo + hi) / 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    best["tried"] = tried
    return best


# -- autohybrid ---------------------------------------------------------------------------


def ah_at(model, inv, space, table, budget, x_calib, tries: int = 4, size=SIZE,
          batch: int = 1) -> dict:
    pb, tried = budget, []
    for _ in range(tries):
        try:
            layers, level = uniform_lowrank(table, inv, space, pb)
        except BudgetError as e:
            return {"unreachable": str(e).splitlines()[0], "tried": tried}
        probe = random_model(model, inv, layers, best_forms(table, inv, layers))
        lat = latency(probe, model, size=size, batch=batch)
        tried.append((round(pb, 4), round(level, 4), round(lat, 3)))
        log(f"  autohybrid predicted budget {pb:.3f}: level {level:.3f}, "
            f"measured (random values) {lat:.3f}")
        if lat <= budget:
            break
        pb -= (lat - budget) + 0.005
    layers = {n: dataclasses.replace(s, fit="data") for n, s in layers.items()}
    alloc = ah.Allocation.for_inventory(inv, layers)
    t = time.time()
    small = ah.apply(model, alloc, inv, progress=False, calibration=x_calib)
    fit_s = time.time() - t
    dep = deploy(copy.deepcopy(small), alloc.layers, best_forms(table, inv, alloc.layers), inv)
    lat = latency(dep, model, size=size, batch=batch)
    log(f"  autohybrid data fit {fit_s:.0f} s; deployed, measured {lat:.3f}")
    return {"model": small, "latency": lat, "level": level, "predicted_budget": pb,
            "predicted": table.fraction(inv, alloc.layers), "tried": tried, "fit_s": fit_s}


# -- the run ------------------------------------------------------------------------------


METHODS = {"tp": "Torch-Pruning", "ah": "autohybrid"}
PROVENANCE = ("Run as", "Stage", "Command", "Date", "Machine", "autohybrid sources",
              "Load average", "Wall time", "Rows and notes")
CARRIED = ("Run as", "Command", "Date", "autohybrid sources", "Load average", "Wall time")


def previous(budgets, methods) -> tuple[list[dict], list[str]]:
    """The section's rows and notes that this run does not redo (method, budget)."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    m = re.search(rf"^## {re.escape(TITLE)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        return [], []
    redo = [(METHODS[k], float(b)) for k in methods for b in budgets]

    def redone(label: str, budget: str) -> bool:
        if label == "dense":
            return True  # always measured again
        return any(label.startswith(k) and float(budget) == b for k, b in redo)

    rows, notes, prov = [], [], []
    for line in m.group(1).splitlines():
        if line.startswith("- ") and line[2:].startswith(CARRIED):
            prov.append(line[2:])  # the earlier run's own provenance, or one it carried
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("method",):
            if not redone(cells[0], cells[1]):
                rows.append(dict(zip(("method", "budget", "lat", "params", "before", "after"),
                                     cells)))
        elif line.startswith("- ") and not line[2:].startswith(PROVENANCE):
            note = line[2:].removeprefix("(earlier run) ")
            if note.startswith("provenance:"):
                notes.append("(earlier run) " + note)
                continue
            hit = re.search(r"(Torch-Pruning|autohybrid)\b.*?(?:at )?(\d\.\d+):", note)
            if hit and not redone(hit.group(1), hit.group(2)):
                notes.append("(earlier run) " + note)
    if rows and prov:
        notes.append("(earlier run) provenance: " + "; ".join(prov))
    if not rows:
        return [], []
    for r in rows:  # a diverged fine-tune, as its note says
        done = r["after"] not in ("", "–") and "NaN" not in r["after"]
        if done and any(r["method"] in n and "final train loss nan" in n for n in notes):
            r["after"] += " (train loss NaN)"
    return rows, notes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=STEPS, help="fine-tune steps per model")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="a subset reruns only those rows; the section keeps the others")
    args = p.parse_args()
    old_rows, old_notes = previous(args.budgets, args.methods)
    torch.set_num_threads(1)
    t0, load0 = time.time(), _common.load_average()
    model = create_model(NAME, checkpoint=CKPT).eval()
    inv = inventory(model, SIZE)
    space = load_search_space(NAME)
    data = load_data(DATA, model, input_size=SIZE)
    splits = data.splits(1024, 1000, seed=0)
    x_calib, _ = as_tensors(splits.calibration)
    dense_params = n_params(model)
    cfg = FinetuneConfig(steps=args.steps, **RECIPE)
    rows: list[dict] = []
    import torch_pruning as tp

    notes: list[str] = [
        f"Run as `OMP_NUM_THREADS=1 nice -n 10 {sys.executable} "
        f"{' '.join(shlex.quote(a) for a in sys.argv)}` (a venv with torch "
        f"{torch.__version__}, torch-pruning {tp.__version__} and autohybrid editable; the "
        "command line below names the project venv). Other benchmarks and tests shared "
        "the 2 cores throughout: see the load averages; the latency ratios are interleaved "
        "with the dense model, so load hits both sides alike."]

    def write(stage: str) -> None:
        body = [
            "Torch-Pruning 1.6 channel pruning (DepGraph `MetaPruner`, "
            "`MagnitudeImportance(p=2)`, one ratio per group, the channels inside each basic "
            "block; the residual stream kept, see the script's docstring) against "
            "autohybrid's uniform low-rank with a data fit (1024 calibration images), each "
            "at a budget on the **measured** latency of the dense model: batch 1, one "
            "thread, torch eager on CPU, timed interleaved with the dense model "
            "(`measure_model`, median of 15 per-round ratios; the median of "
            f"{REPEATS} such measurements). Params: the model's parameter count over the "
            "dense model's. Both fine-tuned with the same config "
            f"({cfg.steps} steps, batch {cfg.batch_size}, SGD {cfg.lr} Nesterov, "
            f"distillation alpha {cfg.alpha} from the dense model, BatchNorm {cfg.bn}, seed "
            f"{cfg.seed}) on the {len(splits.finetune)}-image fine-tune split; top-1 on the "
            "full 10,000-image test split.",
            "",
            _common.table(["method", "budget", "measured latency", "params", "top-1 before",
                           f"top-1 after ({cfg.steps} steps)"],
                          [[r["method"], r["budget"], r["lat"], r["params"], r["before"],
                            r["after"]] for r in rows[:1] + sorted(
                                rows[1:] + old_rows, key=lambda r: (-float(r["budget"]),
                                                                    r["method"]))]),
            "",
            *[f"- {n}" for n in notes + old_notes],
            *(["- Rows and notes this command did not redo come from an earlier run of the "
               "script (notes marked \"(earlier run)\"); `--budgets` / `--methods` name what "
               "a run redoes."] if old_rows else []),
            f"- Stage reached: {stage}.",
            "",
            _common.provenance(time.time() - t0, (load0, _common.load_average())),
        ]
        _common.write_section(TITLE, "\n".join(body), RESULTS)

    log(f"{NAME}: {dense_params} params; dense eval on {len(data.test)} test images")
    dense_top1 = top1(model, data.test)
    rows.append({"method": "dense", "budget": "–", "lat": "1.000", "params": "1.000",
                 "before": f"{dense_top1:.2f}", "after": "–"})
    log(f"dense top-1 {dense_top1:.2f}")
    t = time.time()
    table = measure_table(model, inv, space, threads=1, batch=1, folder=TABLE_DIR)
    log(f"latency table in {time.time() - t:.1f} s; dense {1e3 * table.model_s:.2f} ms")

    students = []  # (row, model)
    for budget in args.budgets:
        r = None
        if "tp" in args.methods:
            log(f"budget {budget}: torch-pruning bisection")
            r = tp_at(model, budget)
        if r is not None and r["ratio"] is None:
            rows.append({"method": "Torch-Pruning", "budget": budget, "lat": "unreachable",
                         "params": "", "before": "", "after": ""})
            notes.append(f"Torch-Pruning {budget}: ratio 0.95 measured {r['tried'][0][1]}.")
        elif r is not None:
            m = r["model"]
            row = {"method": f"Torch-Pruning (ratio {r['ratio']:.3f})", "budget": budget,
                   "lat": f"{r['latency']:.3f}",
                   "params": f"{n_params(m) / dense_params:.3f}",
                   "before": f"{top1(m, data.test):.2f}", "after": "–"}
            rows.append(row)
            students.append((row, m))
            notes.append(f"Torch-Pruning {budget}: bisection (pruning ratio, measured "
                         f"latency) {r['tried']}.")
            log(f"  torch-pruning: {row}")
            write(f"Torch-Pruning {budget} before fine-tune")

        a = None
        if "ah" in args.methods:
            log(f"budget {budget}: autohybrid uniform low-rank, data fit")
            a = ah_at(model, inv, space, table, budget, x_calib)
        if a is None:
            pass
        elif "unreachable" in a:
            rows.append({"method": "autohybrid uniform low-rank, data fit", "budget": budget,
                         "lat": "unreachable", "params": "", "before": "", "after": ""})
            notes.append(f"autohybrid {budget}: unreachable: {a['unreachable']}")
        else:
            m = a["model"]
            row = {"method": f"autohybrid uniform low-rank, data fit (level {a['level']:.3f})",
                   "budget": budget, "lat": f"{a['latency']:.3f}",
                   "params": f"{n_params(m) / dense_params:.3f}",
                   "before": f"{top1(m, data.test):.2f}", "after": "–"}
            rows.append(row)
            students.append((row, m))
            notes.append(f"autohybrid {budget}: (predicted budget, level, measured latency of "
                         f"a random-valued model of the specs) {a['tried']}; the fitted model "
                         f"predicted {a['predicted']:.3f}, data fit {a['fit_s']:.0f} s.")
            log(f"  autohybrid: {row}")
        if a is not None:
            write(f"autohybrid {budget} before fine-tune")

    teacher = CachedTeacher(fast(model))
    for row, m in students:
        log(f"fine-tune {row['method']} at {row['budget']}: {cfg.steps} steps")
        student = m.to(memory_format=torch.channels_last)
        h = finetune(student, teacher, splits.finetune, cfg, progress=False)
        row["after"] = f"{top1(student, data.test):.2f}"
        if h["loss"] != h["loss"]:  # NaN: the fine-tune diverged
            row["after"] += " (train loss NaN)"
        notes.append(f"fine-tune {row['method']} at {row['budget']}: {h['seconds']:.0f} s "
                     f"({h['seconds'] / cfg.steps:.2f} s/step), final train loss "
                     f"{h['loss']:.4f}.")
        log(f"  after fine-tune {row['after']} ({h['seconds']:.0f} s)")
        write(f"fine-tune of {row['method']} at {row['budget']}")
    write("done")


if __name__ == "__main__":
    main()
