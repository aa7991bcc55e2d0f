"""inventory x candidates -> SensitivityTable: how much each layer suffers under each candidate.

For every compressible layer and every candidate of the search space, only that layer is
compressed and the model is scored on the calibration subset against the labels (loss, top-1)
and against the dense model's own outputs (KL divergence, top-1 agreement).

Speed: the model is traced once with ``torch.fx``; per calibration batch the dense values of
every node are computed once, and a candidate re-runs only the nodes downstream of its layer.
One decomposition per layer serves all its ranks. Results are written per finished layer, so
an interrupted run resumes where it stopped, and a finished table is reused for the same key.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from autohybrid.cost import layer_cost
from autohybrid.evaluate import Scores, estimating
from autohybrid.exceptions import ConfigError
from autohybrid.inventory import Inventory, LayerInfo
from autohybrid.io import atomic_path, atomic_write_text, remove_stale_temps
from autohybrid.methods.base import build
from autohybrid.progress import bar as progress_bar
from autohybrid.search_space import SearchSpace
from autohybrid.spec import LayerSpec

__all__ = ["SensitivityTable", "sensitivity", "model_digest", "SIGNALS"]

SIGNALS = ("kl", "dloss", "dtop1", "disagreement")
RECAL_KL_LIMIT = 0.01
TABLE, META = "sensitivity.csv", "sensitivity.json"


def model_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer: identifies the checkpoint actually loaded."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ConeRunner:
    """Runs a traced model node by node; re-runs only the downstream cone of one layer."""

    def __init__(self, model: nn.Module):
        self.gm = fx.symbolic_trace(model)
        self.nodes = list(self.gm.graph.nodes)
        self._cones: dict[str, list[fx.Node]] = {}

    def _run(self, nodes: Iterable[fx.Node], env: dict, free: dict | None = None) -> None:
        """Execute ``nodes`` into ``env``; ``free`` maps a node to the values it used last,
        which are dropped right after it ran (keeps peak memory near a plain forward)."""
        gm = self.gm
        for n in nodes:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_module":
                env[n] = gm.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "get_attr":
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            elif n.op == "output":
                env[n] = args[0]
            for dead in (free or {}).get(n, ()):
                env.pop(dead, None)

    def dense(self, x: torch.Tensor) -> dict:
        env: dict = {}
        first, *optional = [n for n in self.nodes if n.op == "placeholder"]
        env[first] = x
        for n in optional:  # further inputs (timm's ViT: attn_mask=None) take their defaults
            env[n] = n.args[0] if n.args else None
        self._run([n for n in self.nodes if n.op != "placeholder"], env)
        return env

    def output(self, env: dict) -> torch.Tensor:
        return env[self.nodes[-1]]

    def cone(self, name: str) -> list[fx.Node]:
        """Nodes that depend on module ``name`` (itself included), in execution order."""
        if name not in self._cones:
            dirty = {n for n in self.nodes if n.op == "call_module" and n.target == name}
            if not dirty:
                raise ConfigError(f"layer {name!r} is not called in the traced model")
            for n in self.nodes:
                if any(a in dirty for a in n.all_input_nodes):
                    dirty.add(n)
            self._cones[name] = [n for n in self.nodes if n in dirty]
        return self._cones[name]

    def _frees(self, name: str) -> dict:
        """For the cone of ``name``: node -> cone values whose last use it is."""
        key = ("free", name)
        if key not in self._cones:
            cone = self.cone(name)
            last: dict = {}
            for n in cone:
                for a in n.all_input_nodes:
                    last[a] = n
            out_node = self.nodes[-1]
            free: dict = {}
            for value, user in last.items():
                if value in cone and value is not out_node:
                    free.setdefault(user, []).append(value)
            self._cones[key] = free  # type: ignore[assignment]
        return self._cones[key]  # type: ignore[return-value]

    def run_cone(self, env: dict, name: str, module: nn.Module) -> torch.Tensor:
        local = dict(env)
        with swapped(self.gm, name, module):
            self._run(self.cone(name), local, self._frees(name))
        return self.output(local)

    def bn_in_cone(self, name: str) -> list[nn.modules.batchnorm._BatchNorm]:
        mods = [self.gm.get_submodule(n.target) for n in self.cone(name) if n.op == "call_module"]
        return [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class swapped:
    """Context manager: module ``name`` of ``root`` replaced by ``new`` inside the block."""

    def __init__(self, root: nn.Module, name: str, new: nn.Module):
        parent, _, child = name.rpartition(".")
        self.parent = root.get_submodule(parent) if parent else root
        self.child, self.new = child, new

    def __enter__(self):
        self.old = getattr(self.parent, self.child)
        setattr(self.parent, self.child, self.new)

    def __exit__(self, *exc):
        setattr(self.parent, self.child, self.old)


def _bn_state(bns) -> list[dict]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]


def _bn_load(bns, states) -> None:
    for m, s in zip(bns, states):
        m.load_state_dict(s)


@dataclass
class SensitivityTable:
    """One row per (layer, candidate); ``meta`` holds the key and the dense scores."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        with atomic_path(out_dir / TABLE) as tmp:
            self.df.to_csv(tmp, index=False)
        atomic_write_text(out_dir / META, json.dumps(self.meta, indent=2))
        return out_dir

    @classmethod
    def load(cls, out_dir: str | Path) -> SensitivityTable:
        out_dir = Path(out_dir)
        df = pd.read_csv(out_dir / TABLE, keep_default_na=False)
        return cls(df, json.loads((out_dir / META).read_text()))

    def spec(self, row) -> LayerSpec:
        return spec_from_row(row)

    def for_layer(self, name: str) -> pd.DataFrame:
        return self.df[self.df.layer == name]


def spec_from_row(row) -> LayerSpec:
    rank = tuple(int(r) for r in str(row["rank"]).split("x") if r not in ("", "nan"))
    f = row["factorization"]
    return LayerSpec(
        method=row["method"],
        factorization=f if isinstance(f, str) and f else None,
        rank=rank,
        sparsity=float(row["sparsity"]),
        pattern=row["pattern"],
        refine=int(row["refine"]),
    )


@torch.no_grad()
def dense_recal_shift(model: nn.Module, images, recal_images: int, batch_size: int) -> dict:
    """How far BatchNorm recalibration alone moves the dense model (KL, agreement, top-1)."""
    import copy

    from autohybrid.evaluate import recalibrate_bn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return {"kl": 0.0, "agreement": 100.0, "batchnorms": 0}
    recal = copy.deepcopy(model)
    x_r = images[:recal_images]
    recalibrate_bn(recal, torch.utils.data.TensorDataset(x_r, torch.zeros(len(x_r))),
                   batches=None, batch_size=batch_size, progress=False)
    scores = Scores()
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size]
        ref = model(xb)
        scores.add(recal.eval()(xb), ref.argmax(1), ref)
    d = scores.as_dict()
    return {"kl": d["kl"], "agreement": d["agreement"], "batchnorms": len(bns)}


def _row(layer: LayerInfo, spec: LayerSpec, err: float, scores: dict, dense: dict) -> dict:
    c = layer_cost(layer, spec)
    return {
        "layer": layer.name,
        "kind": layer.kind,
        "method": spec.method,
        "factorization": spec.factorization or "",
        "rank": "x".join(str(r) for r in spec.rank),
        "sparsity": spec.sparsity,
        "pattern": spec.pattern,
        "refine": spec.refine,
        "params": c.params,
        "macs": c.macs,
        "params_saved": layer.params - c.params,
        "macs_saved": layer.macs - c.macs,
        "rel_error": err,
        **scores,
        "dloss": scores["loss"] - dense["loss"],
        "dtop1": scores["top1"] - dense["top1"],
        "disagreement": 100.0 - scores["agreement"],
    }


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    inv: Inventory,
    space: SearchSpace,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path | None = None,
    key_extra: dict | None = None,
    batch_size: int = 256,
    bn_recal: bool | str = "auto",
    recal_images: int = 256,
    naive: bool = False,
    layers: list[str] | None = None,
    progress: bool | None = None,
    on_layer: Callable[[str], None] | None = None,
    stats=None,
    fit: dict | None = None,
) -> SensitivityTable:
    """Score every candidate of ``space`` on every compressible layer, one layer at a time.

    Args:
        images, labels: the calibration subset (already preprocessed), from the train split.
        out_dir: where the table lives; a finished table with the same key is returned as
            is, a partial one is continued.
        key_extra: what else identifies the run (data spec, subset size, seed).
        bn_recal: re-estimate downstream BatchNorm statistics on ``recal_images`` calibration
            images for each candidate before scoring it. ``"auto"`` first recalibrates the
            dense model alone and turns recalibration off when that by itself moves the
            outputs (KL > ``RECAL_KL_LIMIT``): checkpoints whose statistics came from augmented
            training data lose accuracy when re-estimated on clean images.
        naive: full forward per candidate (the reference the fast path is checked against).
        layers: restrict to these layer names (default: the space's compressible layers).
        stats: ``autohybrid.stats.LayerStats`` of the dense model on the calibration images:
            every candidate is then fitted to the layer's outputs (``fit: data``, independent
            per layer) instead of its weights.
        fit: data-fit settings (``damp``, ``saliency``), recorded in the table's key.
    """
    model = model.eval()
    recal_check = None
    if bn_recal == "auto":
        recal_check = dense_recal_shift(model, images, recal_images, batch_size)
        bn_recal = recal_check["kl"] <= RECAL_KL_LIMIT
    todo = [la for la in space.compressible(inv) if layers is None or la.name in layers]
    data_digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes())
    data_digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    key_doc = {
        "fingerprint": inv.fingerprint,
        "weights": model_digest(model),
        "data_digest": data_digest.hexdigest()[:16],
        "input_size": list(inv.input_size),
        "space": space.digest,
        "layers": [la.name for la in todo],
        "n": len(images),
        "bn_recal": bn_recal,
        "recal_images": recal_images if bn_recal else 0,
        **(key_extra or {}),
    }
    fit = dict(fit or {})
    if stats is not None:
        from autohybrid.fit import DAMP, SALIENCY

        fit = {"damp": fit.get("damp", DAMP), "saliency": fit.get("saliency", SALIENCY)}
        key_doc["fit"] = {"mode": "data", **fit}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir) if out_dir is not None else None
    partial = out / f".sensitivity-{key}.partial.csv" if out else None
    if out:
        remove_stale_temps(out)  # half-written files of a killed earlier run
    if out and (out / META).is_file() and (out / TABLE).is_file():
        table = SensitivityTable.load(out)
        if table.meta.get("key") == key:
            table.meta["cached"] = True
            return table
    rows: list[dict] = []
    if partial and partial.is_file():
        rows = pd.read_csv(partial, keep_default_na=False).to_dict("records")
    done = {r["layer"] for r in rows}
    resumed = [la.name for la in todo if la.name in done]
    if resumed and progress is not False:
        tqdm.write(f"sensitivity: resuming an interrupted run, {len(resumed)} of {len(todo)} "
                   f"layers already done ({partial})")

    try:
        tracer = ConeRunner(model)
    except Exception as e:  # untraceable model: full forwards, recalibrate every BatchNorm
        tqdm.write(f"sensitivity: torch.fx cannot trace this model ({type(e).__name__}); "
                   "using full forward passes")
        tracer, naive = None, True
    runner = None if naive else tracer
    dense_scores = Scores()
    for xb, yb in _batches(images, labels, batch_size):
        logits = model(xb)
        dense_scores.add(logits, yb, logits)
    dense = dense_scores.as_dict()
    t0 = time.time()
    bar = progress_bar(total=sum(len(space.candidates(la)) for la in todo),
                       desc="sensitivity", unit="cand", progress=progress)
    bar.update(sum(len(space.candidates(la)) for la in todo if la.name in done))
    for layer in todo:
        if layer.name in done:
            continue
        bar.set_postfix_str(layer.name)
        specs = space.candidates(layer)
        dense_mod = model.get_submodule(layer.name)
        w = dense_mod.weight.detach()
        b = dense_mod.bias.detach() if dense_mod.bias is not None else None
        cache: dict = {}
        problem = None
        if stats is not None:
            from dataclasses import replace

            from autohybrid.fit import problem_from_stats

            problem = problem_from_stats(w, stats.h[layer.name], fit["damp"], fit["saliency"])
            specs = [replace(s, fit="data") for s in specs]
        built = [build(w, b, layer, s, problem, cache) for s in specs]
        if tracer is not None:
            bns = tracer.bn_in_cone(layer.name)
        else:
            bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        scores = _score_layer(model, runner, layer.name, [m for m, _ in built], bns, images,
                              labels, batch_size, bn_recal, recal_images)
        rows += [_row(layer, s, e, sc.as_dict(), dense) for s, (_, e), sc in
                 zip(specs, built, scores)]
        if partial:
            with atomic_path(partial) as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
        bar.update(len(specs))
        if on_layer:
            on_layer(layer.name)
    bar.close()
    meta = {
        "key": key, **key_doc, "dense": dense, "model": inv.model_name,
        "seconds": round(time.time() - t0, 2), "method": "naive" if naive else "cached-cone",
        "bn_recal_check": recal_check, "resumed_layers": resumed,
    }
    table = SensitivityTable(pd.DataFrame(rows), meta)
    if out:
        table.save(out)
        partial.unlink(missing_ok=True)
    return table


def _score_layer(model, runner, name, modules, bns, images, labels, batch_size, bn_recal, recal_n):
    """Scores of each candidate module in place of layer ``name``; ``bns`` are the BatchNorms
    downstream of it, re-estimated per candidate when ``bn_recal``."""
    scores = [Scores() for _ in modules]
    original = _bn_state(bns)
    states: list[list[dict] | None] = [None] * len(modules)
    if bn_recal and bns:
        x_r = images[:recal_n]
        recal = list(_batches(x_r, labels[:recal_n], batch_size))
        envs = [runner.dense(xb) for xb, _ in recal] if runner else []
        for i, mod in enumerate(modules):
            with estimating(bns):
                for j, (xb, _) in enumerate(recal):
                    if runner:
                        runner.run_cone(envs[j], name, mod)
                    else:
                        with swapped(model, name, mod):
                            model(xb)
            states[i] = _bn_state(bns)
        del envs
    _bn_load(bns, original)
    try:
        for xb, yb in _batches(images, labels, batch_size):
            env = runner.dense(xb) if runner else None
            ref = runner.output(env) if runner else model(xb)
            for i, mod in enumerate(modules):
                _bn_load(bns, states[i] or original)
                if runner:
                    logits = runner.run_cone(env, name, mod)
                else:
                    with swapped(model, name, mod):
                        logits = model(xb)
                scores[i].add(logits, yb, ref)
            _bn_load(bns, original)
    finally:
        _bn_load(bns, original)
    return scores
