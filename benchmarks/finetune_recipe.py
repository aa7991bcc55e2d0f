"""Which fine-tune recipe keeps the DENSE model whole? A dense control on the shared checkpoints.

The dense control: fine-tune a copy of the dense model against itself as the teacher
(``student = deepcopy(dense)``, ``teacher = dense``) for 750 optimizer steps at batch 128 on
the training split, then measure top-1 on the full 10,000-image test split. A recipe that is
safe as a default should change nothing here: the student starts at the teacher, so every
point it loses is the recipe's own damage (label noise pulling away from the teacher,
BatchNorm statistics re-estimated from augmented batches, a learning rate that walks off).

Recipes (everything else at ``FinetuneConfig`` defaults, flip on, seed 0):

    A  adamw lr 3e-4, alpha 0.7, bn train    (the previous default)
    B  adamw lr 1e-4, alpha 1.0, bn frozen
    C  sgd lr 0.01 momentum 0.9 nesterov, alpha 1.0, bn frozen
    D  adamw lr 3e-4, alpha 1.0, bn train

For ResNet-20 only, the same recipes also fine-tune a compressed model (0.2 of the params,
global magnitude mask with values refit to data: ``datafit.py``'s ``gm_d_mag`` row, the
BatchNorm variant with the lower calibration KL), to show a recipe still repairs one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_recipe.py           # resumable
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_recipe.py --deadline-at 16:05
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_recipe.py --report  # only the .md

Rows run in ``PRIORITY`` order (below), not model by model: a row costs ~10-14 minutes on one
core, so a time box holds only some of them, and those should answer the question first.

One JSON per (model, start, recipe) under ``benchmarks/results/finetune_recipe/``, keyed by
the settings that decide its numbers; a rerun skips rows whose stored key matches. A row
interrupted mid-run resumes from its fine-tune checkpoint under ``benchmarks/out/`` (saved
every 50 steps; the library's resume is bit-exact). The teacher's outputs are cached there
too, keyed by a hash of the exact input batch: every recipe (and the compressed rows) sees the
same batches for seed 0, so the teacher's forward pass runs once per model, not once per row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
import traceback
from pathlib import Path

import _common  # before torch: records the caller's thread settings
import datafit
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autohybrid.apply import apply
from autohybrid.data import load_data
from autohybrid.evaluate import evaluate, recalibrate_bn
from autohybrid.finetune import FinetuneConfig, finetune
from autohybrid.io import atomic_write_text
from autohybrid.models import create_model

MODELS = ("cifar_resnet20", "mobilenetv3_small_100", "vit_tiny_patch16_224", "cifar_resnet56",
          "tf_efficientnet_lite0")  # cheapest first
RECIPES = {
    "A": dict(optimizer="adamw", lr=3e-4, alpha=0.7, bn="train"),
    "B": dict(optimizer="adamw", lr=1e-4, alpha=1.0, bn="frozen"),
    "C": dict(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=True, alpha=1.0, bn="frozen"),
    "D": dict(optimizer="adamw", lr=3e-4, alpha=1.0, bn="train"),
}
LABELS = {
    "A": "A: adamw 3e-4, α 0.7, bn train (the search's default)",
    "B": "B: adamw 1e-4, α 1.0, bn frozen",
    "C": "C: sgd 0.01 nesterov, α 1.0, bn frozen",
    "D": "D: adamw 3e-4, α 1.0, bn train",
}
ORDER = ("B", "C", "A", "D")  # B and C first
STEPS, BATCH, SEED, SAVE_EVERY = 750, 128, 0, 50
COMPRESSED = ("cifar_resnet20", 0.2, "gm_d_mag")  # model, budget, datafit row
COMPRESSED_RECIPES = ("B", "C", "A")
# channels-last is ~1.5x faster for the ResNets' convs on this CPU (same numbers to float
# rounding); MobileNetV3 measured no faster, the ViT has no convs to speak of
CHANNELS_LAST = {"cifar_resnet20", "cifar_resnet56"}
RES = _common.BENCH_DIR / "results" / "finetune_recipe"
OUT = _common.BENCH_DIR / "out" / "finetune_recipe"
RESULTS = _common.BENCH_DIR / "RESULTS_finetune.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def config(recipe: str, steps: int = STEPS) -> FinetuneConfig:
    return FinetuneConfig(steps=steps, batch_size=BATCH, flip=True, seed=SEED,
                          **RECIPES[recipe])


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fast(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


class CachedTeacher(nn.Module):
    """The dense model, its outputs remembered per exact input batch (blake2b of the bytes).

    Every row of a model sees the same augmented batches (data order and augmentation are
    pure functions of the seed), so after the first row the teacher costs a hash per step.
    A batch never seen before (another seed, a bug) is simply computed: no assumption."""

    def __init__(self, model: nn.Module, path: Path):
        super().__init__()
        self.model, self.path = model, path
        self.cache: dict[str, torch.Tensor] = {}
        if path.exists():
            self.cache = torch.load(path, weights_only=True)
        self.hits = self.misses = 0
        self._saved = len(self.cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():  # only the fine-tune's no-grad eval call
            return self.model(x)
        key = hashlib.blake2b(x.detach().contiguous().cpu().numpy().tobytes(),
                              digest_size=16).hexdigest()
        out = self.cache.get(key)
        if out is None:
            self.misses += 1
            out = self.model(x).detach().float().clone()
            self.cache[key] = out
        else:
            self.hits += 1
        return out.to(x.device)

    def save(self) -> None:
        if len(self.cache) != self._saved:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save(self.cache, tmp)
            os.replace(tmp, self.path)
            self._saved = len(self.cache)


class Model:
    """One checkpoint: the dense model, its data, its test logits and top-1."""

    def __init__(self, name: str, test_limit: int | None):
        self.name, self.test_limit = name, test_limit
        self.size = datafit.SIZES.get(name, (3, 32, 32))
        self.dense = create_model(name, num_classes=10, checkpoint=datafit.MODELS[name]).eval()
        if name in CHANNELS_LAST:
            self.dense = self.dense.to(memory_format=torch.channels_last)
        self.data = load_data(datafit.DATA, self.dense, input_size=self.size)
        test = self.data.test
        if test_limit:
            test = torch.utils.data.Subset(test, range(min(test_limit, len(test))))
        self.test = test
        t = time.time()
        r = evaluate(_fast(self.dense), self.test, progress=False, keep_logits=True)
        self.logits, self.top1 = r["logits"], r["top1"]
        self.info = {"top1": r["top1"], "n": r["n"], "eval_s": time.time() - t,
                     "input_size": list(self.size), "preprocess": repr(self.data.preprocess),
                     "params": sum(p.numel() for p in self.dense.parameters()),
                     "has_bn": any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for m in self.dense.modules()),
                     "channels_last": name in CHANNELS_LAST}
        atomic_write_text(RES / name / "dense.json", json.dumps(self.info, indent=1))
        self.teacher = CachedTeacher(self.dense, OUT / name / f"teacher_s{SEED}_b{BATCH}.pt")
        log(f"{name}: dense {self.top1:.2f} % on {r['n']} test images, input {self.size}")

    def measure(self, model: nn.Module) -> dict:
        t = time.time()
        r = evaluate(_fast(model), self.test, progress=False, reference=self.logits)
        return {"top1": r["top1"], "loss": r["loss"], "agreement": r["agreement"],
                "kl": r["kl"], "eval_s": time.time() - t}


def compressed_student(m: Model) -> tuple[nn.Module, dict]:
    """ResNet-20 at 0.2 of its params, global magnitude mask refit to data (``gm_d_mag``),
    the BatchNorm variant with the lower calibration KL, as ``datafit.py`` measures it."""
    name, budget, row = COMPRESSED
    ctx = datafit.Context(name, 512, None)  # None: reads datafit's cached dense row only
    alloc, info = ctx.allocation(datafit.ROWS[row], budget)
    patch = (datafit.magnitude_masks(ctx.model) if datafit.ROWS[row].mask == "magnitude"
             else contextlib.nullcontext())
    t = time.time()
    with patch:
        small = apply(ctx.model, alloc, inv=ctx.inv, calibration=ctx.x, progress=False)
    info["apply_s"] = time.time() - t
    info["params_fraction"] = alloc.cost(ctx.inv).params_fraction
    recal = copy.deepcopy(small)
    recalibrate_bn(recal, TensorDataset(ctx.x, torch.zeros(len(ctx.x))), batches=None,
                   progress=False)
    kls = {tag: evaluate(v, TensorDataset(ctx.x, ctx.y), progress=False,
                         reference=ctx.calib_logits)["kl"]
           for tag, v in (("asis", small), ("recal", recal))}
    choice = min(kls, key=kls.get)
    info.update(calib_kl=kls, choice=choice)
    info["before"] = {tag: m.measure(v) for tag, v in (("asis", small), ("recal", recal))}
    return (recal if choice == "recal" else small), info


def settings_key(model: str, start: str, recipe: str, steps: int, test_limit: int | None):
    return {"model": model, "checkpoint": datafit.MODELS[model].name, "start": start,
            "recipe": recipe, "config": config(recipe, steps).to_dict(), "steps": steps,
            "test_limit": test_limit}


def row_path(model: str, start: str, recipe: str) -> Path:
    return RES / model / f"{start}-{recipe}.json"


def run_row(m: Model, start: str, recipe: str, steps: int) -> dict:
    doc: dict = {"key": settings_key(m.name, start, recipe, steps, m.test_limit),
                 "label": LABELS[recipe], "command": _common.command_line(),
                 "library": _common.library_fingerprint(), "date": _common.now(),
                 "machine": _common.machine(), "dense_top1": m.top1}
    if start == "dense":
        student = copy.deepcopy(m.dense)
    else:
        student, info = compressed_student(m)
        doc["compressed"] = info
        doc["before_top1"] = info["before"][info["choice"]]["top1"]
    ckpt = OUT / m.name / f"{start}-{recipe}-s{steps}"
    t0, hits0, miss0 = time.time(), m.teacher.hits, m.teacher.misses

    def on_step(step: int, loss: float) -> None:
        if step % SAVE_EVERY == 0:
            m.teacher.save()  # with the fine-tune checkpoint, so a resume hits the cache
            log(f"  {m.name} {start}-{recipe}: step {step}/{steps}, loss {loss:.4f}, "
                f"{time.time() - t0:.0f} s")

    cfg = dataclasses.replace(config(recipe, steps), save_every=SAVE_EVERY)
    h = finetune(student, m.teacher, m.data.train, cfg, checkpoint_dir=ckpt, progress=False,
                 on_step=on_step)
    m.teacher.save()
    doc["finetune"] = {k: h[k] for k in ("steps", "steps_run", "resumed_from", "train_loss",
                                         "seconds")}
    doc["teacher_cache"] = {"hits": m.teacher.hits - hits0, "misses": m.teacher.misses - miss0}
    doc["after"] = m.measure(student)
    doc["top1"] = doc["after"]["top1"]
    doc["delta"] = doc["top1"] - (m.top1 if start == "dense" else doc["before_top1"])
    bad = [n for n, p in student.named_parameters() if not bool(torch.isfinite(p).all())]
    doc["nonfinite_params"] = bad
    doc["status"] = "ok"
    return doc


def _start_name() -> str:
    return f"{COMPRESSED[2]}{COMPRESSED[1]:g}"


R20, MNV3, VIT, R56, EFF = MODELS
COMP = "comp"  # the compressed ResNet-20 start, in PRIORITY
# The order rows run in. Measured at ~1.1 s a step on this shared machine (~14 min a row), a
# two-hour box holds about eight rows, so the queue is by priority, not model by model:
# the candidate defaults (B, C) on the cheapest checkpoints first, the default A on
# ResNet-20 for contrast, the repair check with the candidate and the old recipe, then the
# rest (D, which only separates alpha from the BatchNorm / lr change, comes after B and C
# everywhere).
PRIORITY = [
    (R20, "dense", "B"), (R20, "dense", "C"), (R20, "dense", "A"),
    (MNV3, "dense", "B"), (MNV3, "dense", "C"),
    (R20, COMP, "C"), (R20, COMP, "A"),
    (VIT, "dense", "B"), (VIT, "dense", "C"),
    (R20, "dense", "D"), (R20, COMP, "B"),
    (MNV3, "dense", "A"), (VIT, "dense", "A"),
    (R56, "dense", "B"), (R56, "dense", "C"),
    (EFF, "dense", "B"), (EFF, "dense", "C"),
    (MNV3, "dense", "D"), (VIT, "dense", "D"),
    (R56, "dense", "A"), (R56, "dense", "D"), (EFF, "dense", "A"), (EFF, "dense", "D"),
]


def queue(models: list[str], recipes: list[str], compressed: bool) -> list[tuple[str, str, str]]:
    q = []
    for model, start, recipe in PRIORITY:
        if model not in models or recipe not in recipes or (start == COMP and not compressed):
            continue
        q.append((model, _start_name() if start == COMP else start, recipe))
    return q


def run(models, recipes, compressed, steps, test_limit, deadline_min) -> None:
    torch.set_num_threads(1)
    t_start = time.time()
    ctx: Model | None = None
    for model, start, recipe in queue(models, recipes, compressed):
        path = row_path(model, start, recipe)
        key = settings_key(model, start, recipe, steps, test_limit)
        old = _read(path)
        if old and old.get("key") == key and old.get("status") == "ok":
            log(f"{model} {start}-{recipe}: cached ({old['top1']:.2f}, {old['delta']:+.2f})")
            continue
        if deadline_min is not None and time.time() - t_start > deadline_min * 60:
            log(f"deadline ({deadline_min} min) passed: not starting {model} {start}-{recipe}")
            continue
        if ctx is None or ctx.name != model:
            ctx = Model(model, test_limit)
        log(f"{model} {start}-{recipe}: {LABELS[recipe]} ...")
        t = time.time()
        try:
            doc = run_row(ctx, start, recipe, steps)
        except Exception as e:  # record it; a package bug is reported, not fixed here
            doc = {"key": key, "label": LABELS[recipe], "status": "error",
                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                   "command": _common.command_line(), "library": _common.library_fingerprint(),
                   "date": _common.now()}
        doc["row_s"] = time.time() - t
        atomic_write_text(path, json.dumps(doc, indent=1))
        if doc["status"] == "ok":
            log(f"{model} {start}-{recipe}: top-1 {doc['top1']:.2f} ({doc['delta']:+.2f}), "
                f"{doc['row_s']:.0f} s, teacher cache {doc['teacher_cache']}")
        else:
            log(f"{model} {start}-{recipe}: {doc['error'][:300]}")
        report()


# -- report ------------------------------------------------------------------------------


def _load_all() -> dict:
    out: dict = {}
    for path in sorted(RES.glob("*/*.json")):
        d = _read(path)
        if d is not None:
            out.setdefault(path.parent.name, {})[path.stem] = d
    return out


def _cell(d: dict | None) -> str:
    if d is None:
        return "—"
    if d.get("status") != "ok":
        return "ERROR"
    return f"{d['top1']:.2f} ({d['delta']:+.2f})"


def report() -> Path:
    allres = _load_all()
    parts = [
        "# Fine-tune recipe: the dense control",
        "",
        "Written by `benchmarks/finetune_recipe.py --report` from the JSON in "
        "`benchmarks/results/finetune_recipe/` (one file per model / start / recipe, with the "
        "exact command, library fingerprint, date, machine, train loss and timings).",
        "",
        f"**Dense control**: the dense checkpoint fine-tuned against itself as the teacher "
        f"(`student = deepcopy(dense)`, `teacher = dense`) with `autohybrid.finetune.finetune` "
        f"for {STEPS} optimizer steps at batch {BATCH} on the 50,000-image training split "
        f"(≈{STEPS * BATCH / 50000:.2f} epochs), then top-1 on the full 10,000-image test "
        "split. The student starts equal to the teacher, so any change is the recipe's own "
        "doing. Goal: the default recipe loses at most 0.2 points on every checkpoint.",
        "",
        "Recipes; everything else at `FinetuneConfig` defaults (warmup 0.05 then cosine to 0, "
        "T = 4, crop padding 4 + flip, grad clip 5, weight decay 0), seed 0:",
        "",
        *[f"- {LABELS[r]}: `{RECIPES[r]}`" for r in RECIPES],
        "",
        "Cells: test top-1 % after the control (change vs the dense model, points). "
        "`—` = not run (the run stopped at its time box; rerunning the command fills it in).",
        "",
    ]
    head = ["model", "dense top-1", *[LABELS[r].split(":")[0] for r in ORDER]]
    body, missing = [], []
    for model in MODELS:
        res = allres.get(model, {})
        dense = res.get("dense") or {}
        cells = []
        for r in ORDER:
            cells.append(_cell(res.get(f"dense-{r}")))
            if res.get(f"dense-{r}") is None:
                missing.append(f"{model} {r}")
        body.append([f"`{model}`", f"{dense['top1']:.2f}" if "top1" in dense else "—", *cells])
    parts += [_common.table(head, body), ""]
    abody = []
    for model in MODELS:
        res = allres.get(model, {})
        cells = [f"{d['after']['agreement']:.2f}" if d and d.get("status") == "ok" else "—"
                 for d in (res.get(f"dense-{r}") for r in ORDER)]
        abody.append([f"`{model}`", *cells])
    parts += ["How far each control moved the model, whatever its top-1 did: **agreement** "
              "(% of the 10,000 test images whose top-1 class equals the dense model's).", "",
              _common.table(["model", *head[2:]], abody), ""]
    worst = {}
    for r in ORDER:
        ds = [allres.get(mm, {}).get(f"dense-{r}") for mm in MODELS]
        ds = [d for d in ds if d and d.get("status") == "ok"]
        if ds:
            worst[r] = (min(d["delta"] for d in ds), len(ds))
    if worst:
        parts += ["Worst change per recipe over the checkpoints it ran on: " + "; ".join(
            f"{r} {w:+.2f} ({n} of {len(MODELS)})" for r, (w, n) in worst.items()) + ".", ""]
    if missing:
        parts += [f"Missing rows (not run within the time box): {', '.join(missing)}.", ""]
    # compressed ResNet-20
    name, budget, row = COMPRESSED
    comp = {r: allres.get(name, {}).get(f"{_start_name()}-{r}") for r in COMPRESSED_RECIPES}
    parts += [f"## Repair of a compressed ResNet-20 ({budget:g} of the params)", "",
              f"`{name}` compressed by `datafit.py`'s `{row}` row (global magnitude allocation "
              "and mask, kept values refit to the outputs on 512 calibration images, "
              "sequential), starting from the BatchNorm variant (as is / recalibrated on the "
              "calibration images) with the lower calibration KL to the dense model, then "
              f"fine-tuned with the recipe for the same {STEPS} steps against the dense "
              "teacher.", ""]
    cbody = []
    for r, d in comp.items():
        if d is None:
            cbody.append([LABELS[r], "—", "—", "—"])
        elif d.get("status") != "ok":
            cbody.append([LABELS[r], "ERROR", d.get("error", "")[:80], ""])
        else:
            c = d["compressed"]
            cbody.append([LABELS[r], f"{d['before_top1']:.2f} ({c['choice']}, params "
                          f"{c['params_fraction']:.3f})", f"{d['top1']:.2f}",
                          f"{d['delta']:+.2f}"])
    parts += [_common.table(["recipe", "top-1 before", "top-1 after", "gain"], cbody,
                            "llrr"), ""]
    # detail
    parts += ["<details><summary>Detail: every row (agreement with the dense model on the "
              "test split, KL, train loss, timings)</summary>", ""]
    dh = ["model", "row", "top-1", "Δ", "agreement %", "test KL", "train loss", "fine-tune s",
          "s / step", "teacher cache hits", "library"]
    db = []
    for model in MODELS:
        for stem, d in allres.get(model, {}).items():
            if stem == "dense" or d.get("status") != "ok":
                continue
            f = d["finetune"]
            db.append([model, stem, f"{d['top1']:.2f}", f"{d['delta']:+.2f}",
                       f"{d['after']['agreement']:.2f}", f"{d['after']['kl']:.4f}",
                       f"{f['train_loss'][-1]:.4f}", f"{f['seconds']:.0f}",
                       f"{f['seconds'] / max(1, f['steps_run']):.2f}",
                       f"{d['teacher_cache']['hits']}/{STEPS}", d["library"]])
    parts += [_common.table(dh, db, "ll" + "r" * (len(dh) - 2)), "", "</details>", ""]
    parts += _notes_section()
    cmds = sorted({d["command"] for r in allres.values() for d in r.values() if "command" in d})
    libs = sorted({d["library"] for r in allres.values() for d in r.values() if "library" in d})
    parts += ["## Provenance", "", "Commands that produced the rows (from the repository root):",
              "", *[f"- `{c}`" for c in cmds], "",
              f"- Machine: {_common.machine()}",
              "- One core: `OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`; the machine's other "
              "core was busy with other work, so timings are indicative only.",
              f"- autohybrid sources (sha256 of `autohybrid/**/*.py` when each row ran): "
              f"{', '.join(libs) or '—'}; the report step: {_common.library_fingerprint()}",
              f"- Report written {_common.now()}"]
    atomic_write_text(RESULTS, "\n".join(parts).rstrip() + "\n")
    return RESULTS


def _notes_section() -> list[str]:
    """The "Notes" section as it stands in RESULTS (written by hand from the rows): kept, not
    overwritten, when the report is rewritten."""
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    start, end = text.find("## Notes"), text.find("## Provenance")
    if start < 0 or end < start:
        return []
    return text[start:end].rstrip().split("\n") + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--recipes", nargs="+", default=list(ORDER), choices=list(RECIPES))
    p.add_argument("--no-compressed", action="store_true", help="skip the ResNet-20 repair rows")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--deadline-min", type=float, default=None,
                   help="start no new row after this many minutes")
    p.add_argument("--deadline-at", default=None, metavar="HH:MM",
                   help="start no new row after this local time (today)")
    p.add_argument("--report", action="store_true", help="only write RESULTS_finetune.md")
    p.add_argument("--scratch", type=Path, default=None,
                   help="write rows, checkpoints and report under this folder (smoke tests)")
    a = p.parse_args()
    if a.scratch is not None:
        global RES, OUT, RESULTS
        RES, OUT, RESULTS = a.scratch / "results", a.scratch / "out", a.scratch / "RESULTS.md"
    if a.report:
        print(report())
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    deadline = a.deadline_min
    if a.deadline_at is not None:
        hh, mm = map(int, a.deadline_at.split(":"))
        lt = time.localtime()
        deadline = ((hh * 60 + mm) - (lt.tm_hour * 60 + lt.tm_min + lt.tm_sec / 60))
    run(a.models, a.recipes, not a.no_compressed, a.steps, a.test_limit, deadline)
    print(report())


if __name__ == "__main__":
    main()
