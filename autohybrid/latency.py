"""Latency as a budget: per-layer times measured on the target runtime, kept as ratios.

``LatencyTable`` holds, for every compressible layer, the dense layer's time and, for every
candidate spec, the time of each form it can be deployed in (``autohybrid.deploy``) as a
ratio to the dense layer, measured interleaved with it (per-round ratios, their median: drift
on a shared machine hits both sides alike), at the model's input size and one batch size,
on one runtime (``torch`` eager on CPU, or ONNX Runtime's CPU provider) at a thread count. A
spec costs its fastest form. The model's predicted time is the dense model's measured time
less what each compressed layer saves::

    T(alloc) = T_dense - sum_l alpha_m(l) * t_l * (1 - ratio_l(spec_l))

with ``t_l`` the layer's time inside the dense model (forward hooks around it in whole-model
runs; on torch), not alone: alone, a ResNet-56's layers at batch 64 sum to 1.45x the whole
model, and the layers that gain most from that are not the ones the ratios favour.

``alpha`` calibrates layers timed alone against layers timed in the model (caches, the
allocator, the framework's per-op cost between them: at batch 64 a ResNet-56's layers timed
alone sum to 1.45x the whole model), one per method (a sparse kernel and a low-rank chain
gain or lose differently inside the model): for each method a probe model is timed whole
(the median of three interleaved timings), every layer that has a faster spec of the method
compressed to about one common ratio, chosen so that the prediction reaches the probe's
target (the search's budget; by default every layer at its fastest), and the method's
``alpha`` makes the prediction match it (kept within [0.2, 5]; a method whose probe saves
under 2 % of the dense time takes the largest-saving method's). The table records the target
and the probe's kind, and a search with a budget 0.1 or more away re-probes.

The table's specs are the search's keep levels (``search.params.LEVELS``, and the shares
for low-rank + sparse); a spec between them (a repaired trial scales levels continuously)
is interpolated in its kept fraction between the two measured levels of its method. The
prediction is pure arithmetic on the table; the measurements live in ``measure_*``.

The table is cached as JSON under the search's output folder, keyed by machine, runtime,
threads, input size, batch and the model's layer fingerprint, and written after every layer,
so an interrupted measurement resumes. A machine id cannot tell two virtual machines with the
same CPU name apart, and a host's speed can change under the same id, so every reuse of a
stored table first times the dense model again: more than ``DRIFT`` away from the stored
time, the table is measured anew (a table mixing two machines' seconds mispredicts). 50 %:
one VM's own speed moved by up to 36 % within minutes, a second VM of the same name ran
2.2-4.5x faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autohybrid.config import RUNTIMES
from autohybrid.deploy import deploy_module, forms_for
from autohybrid.exceptions import ConfigError
from autohybrid.inventory import Inventory, LayerInfo
from autohybrid.io import atomic_path
from autohybrid.methods import HYBRID, METHODS, get_method
from autohybrid.progress import bar
from autohybrid.spec import LayerSpec

__all__ = ["RUNTIMES", "LatencyTable", "machine_id", "table_key", "measure_table",
           "time_interleaved", "random_module", "layer_batch_input", "spec_key",
           "kept_fraction", "measure_model"]

VERSION = 1
ROUNDS = 9  # interleaved rounds per spec
REPEATS = 3  # whole-model measurements whose median is reported (one varies by a few %)
PROBE = 3  # alpha's probes: one per method, every faster layer at one common ratio (1: one
# probe of a few layers at their fastest; 2: one common-ratio probe over all methods)
MIN_CALL_S = 2e-3  # each timed call repeats the forward until the dense one takes this long
DRIFT = 0.5  # a stored table whose dense model now times this much off is measured anew


def machine_id() -> str:
    """The CPU model, its core count and the host name: a table measured on one machine
    does not predict another."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} @ {platform.node()}"


def table_key(runtime: str, threads: int, input_size, batch: int, fingerprint: str,
              machine: str | None = None) -> dict:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return {"version": VERSION, "machine": machine or machine_id(), "runtime": runtime,
            "threads": int(threads), "input_size": [int(v) for v in input_size],
            "batch": int(batch), "fingerprint": fingerprint}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def spec_key(spec: LayerSpec) -> str:
    """What a spec's speed depends on: its structure, not how its values were fitted."""
    d = spec.to_dict()
    d.pop("fit", None)
    d.pop("refine", None)
    return json.dumps(d, sort_keys=True)


def kept_fraction(layer: LayerInfo, spec: LayerSpec) -> float:
    if spec.method == "dense":
        return 1.0
    weights = get_method(spec.method).params(layer, spec) - (layer.out_chs if layer.bias else 0)
    return max(weights, 1) / layer.weight_numel


def _share(layer: LayerInfo, spec: LayerSpec) -> float:
    """The sparse residual's part of an L+S spec's kept weights."""
    m = METHODS[HYBRID]
    nnz = m.nnz(layer, spec)
    total = m.params(layer, spec) - (layer.out_chs if layer.bias else 0)
    return nnz / max(total, 1)


def _family(layer: LayerInfo, spec: LayerSpec) -> str:
    """Specs one interpolation runs over: method, factorization, pattern (and for L+S the
    nearest of the searched shares)."""
    from autohybrid.search.params import SHARES

    fam = [spec.method, spec.factorization or "", spec.pattern]
    if spec.method == HYBRID:
        s = _share(layer, spec)
        fam.append(f"{min(SHARES, key=lambda v: abs(v - s)):g}")
    return "|".join(fam)


@dataclass
class LatencyTable:
    """Measured per-layer latencies (see the module docstring)."""

    key: dict
    model_s: float = 0.0
    dense_s: dict[str, float] = field(default_factory=dict)
    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    families: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> key -> fam
    kept: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    alpha: float | None = None  # in-model calibration of the savings (None: not yet)
    alpha_at: float | None = None  # the predicted fraction of the probe alpha came from
    in_model_s: dict[str, float] = field(default_factory=dict)  # t_l inside the model
    alpha_probe: int = 0  # how alpha's probe was built (PROBE; older tables re-probe)
    alphas: dict[str, float] = field(default_factory=dict)  # per method, where probed
    margin: float = 0.0  # share of a budget kept in reserve (a search setting, not stored)
    _curves: dict = field(default_factory=dict, repr=False, compare=False)

    # -- lookups ------------------------------------------------------------------------
    def forms(self, layer: str, spec: LayerSpec) -> dict[str, float] | None:
        """The measured ratio of each form of ``spec`` (None when not measured)."""
        return self.rows.get(layer, {}).get(spec_key(spec))

    def best_form(self, layer: str, spec: LayerSpec) -> tuple[str, float] | None:
        forms = self.forms(layer, spec)
        if not forms:
            return None
        form = min(forms, key=forms.get)
        return form, forms[form]

    def _curve(self, layer: str, family: str) -> tuple[np.ndarray, np.ndarray]:
        cached = self._curves.get((layer, family))
        if cached is not None:
            return cached
        pts = sorted((self.kept[layer][k], min(f.values()))
                     for k, f in self.rows.get(layer, {}).items()
                     if self.families[layer].get(k) == family)
        xs = np.array([p[0] for p in pts])
        # a spec keeping more is never faster: the running max over kept fractions
        ys = np.maximum.accumulate(np.array([p[1] for p in pts])) if pts else np.array([])
        self._curves[(layer, family)] = xs, ys
        return xs, ys

    def ratio(self, layer: LayerInfo, spec: LayerSpec) -> float:
        """``spec``'s time over the dense layer's, in its fastest form, on its family's
        curve: the measured specs' ratios made non-decreasing in the kept fraction (running
        max: a spec keeping more is not believed faster, noise aside), interpolated between
        them. A measured spec reads its own ratio unless noise put it below a smaller one."""
        if spec.method == "dense":
            return 1.0
        family = _family(layer, spec)
        xs, ys = self._curve(layer.name, family)
        if len(xs) == 0:  # e.g. an N:M pattern the table has no level of: the same method
            near = "|".join(family.split("|")[:2])  # and factorization, any pattern / share
            fams = sorted({f for f in self.families.get(layer.name, {}).values()
                           if f.startswith(near + "|")})
            if not fams:
                raise ConfigError(
                    f"the latency table has no {spec.method} entry for layer {layer.name}; "
                    "measure it with this search space (measure_table)")
            xs, ys = self._curve(layer.name, fams[0])
        return float(np.interp(kept_fraction(layer, spec), xs, ys))

    def t(self, name: str) -> float:
        """The dense layer's time: inside the model where measured, else alone."""
        return self.in_model_s.get(name) or self.dense_s[name]

    def layer_seconds(self, layer: LayerInfo, spec: LayerSpec) -> float:
        return self.t(layer.name) * self.ratio(layer, spec)

    def predict(self, inv: Inventory, layers: Mapping[str, LayerSpec]) -> float:
        """Predicted seconds of the model with ``layers`` compressed."""
        by_name = inv.by_name
        alpha = 1.0 if self.alpha is None else self.alpha
        saved = sum(self.alphas.get(s.method, alpha) * self.t(n) *
                    (1.0 - self.ratio(by_name[n], s))
                    for n, s in layers.items() if s.method != "dense")
        return max(self.model_s - saved, 0.05 * self.model_s)

    def fastest(self, inv: Inventory) -> dict[str, LayerSpec]:
        """Every layer at its fastest measured spec, where one beats the dense layer."""
        out = {}
        for name, rows in self.rows.items():
            best = min(((self.ratio(inv.by_name[name], LayerSpec.from_dict(json.loads(k))), k)
                        for k in rows), default=None)
            if best is not None and best[0] < 1.0:
                out[name] = LayerSpec.from_dict(json.loads(best[1]))
        return out

    @property
    def reference_s(self) -> float:
        """What a latency fraction is taken of: the dense model's time less the margin, so a
        search keeping fractions within a budget keeps the prediction ``margin`` under it."""
        return self.model_s * (1.0 - self.margin)

    def fraction(self, inv: Inventory, layers: Mapping[str, LayerSpec]) -> float:
        """The predicted fraction of the dense latency, the margin added (what a budget
        counts)."""
        return self.predict(inv, layers) / self.reference_s

    def predicted_fraction(self, inv: Inventory, layers: Mapping[str, LayerSpec]) -> float:
        """The predicted fraction of the dense latency itself (what a measurement checks)."""
        return self.predict(inv, layers) / self.model_s

    # -- storage ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"key": self.key, "model_s": self.model_s, "dense_s": self.dense_s,
                "rows": self.rows, "families": self.families, "kept": self.kept,
                "seconds": self.seconds, "alpha": self.alpha, "alpha_at": self.alpha_at,
                "in_model_s": self.in_model_s, "alpha_probe": self.alpha_probe,
                "alphas": self.alphas}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        return cls(d["key"], d.get("model_s", 0.0), d.get("dense_s", {}), d.get("rows", {}),
                   d.get("families", {}), d.get("kept", {}), d.get("seconds", 0.0),
                   d.get("alpha"), d.get("alpha_at"), d.get("in_model_s") or {},
                   alpha_probe=d.get("alpha_probe", 0), alphas=d.get("alphas") or {})

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @staticmethod
    def path_for(folder: Path, key: dict) -> Path:
        return Path(folder) / f"latency-{key['runtime']}-{_digest(key)}.json"


# -- measurement ----------------------------------------------------------------------------


def layer_batch_input(layer: LayerInfo, batch: int) -> torch.Tensor:
    from autohybrid.testing import layer_input

    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *layer_input(layer), generator=g)


@torch.no_grad()
def random_module(layer: LayerInfo, spec: LayerSpec, seed: int = 0) -> nn.Module:
    """``spec``'s module for ``layer`` with random values and a random sparse pattern: what
    it runs at, not what it computes, is measured."""
    from autohybrid.layers import _SparseBase
    from autohybrid.methods.sparse import magnitude_topk, parse_block

    g = torch.Generator().manual_seed(seed)
    module = get_method(spec.method).skeleton(layer, spec)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    block = parse_block(spec.pattern) is not None
    for m in module.modules():
        if isinstance(m, _SparseBase):
            numel = int(np.prod(m.shape))
            if block:  # random whole blocks: a BSR kernel runs blocks, not entries
                scores = torch.rand(m.shape, generator=g)
                idx = magnitude_topk(scores, m.nnz, spec.pattern)
            else:
                idx = torch.randperm(numel, generator=g)[: m.nnz].sort().values
            m.indices.copy_(idx)
    return module.eval()


class _Runner:
    """A module made runnable on one runtime: ``fn()`` runs it once on the input."""

    def __init__(self, runtime: str, threads: int):
        self.runtime, self.threads = runtime, threads

    def __call__(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        if self.runtime == "torch":
            def fn():
                with torch.inference_mode():
                    return module(x)
            return fn
        import onnxruntime as ort

        buf = io.BytesIO()
        torch.onnx.export(module.eval(), (x,), buf, input_names=["input"],
                          output_names=["output"], dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        return lambda: sess.run(None, feed)


def time_interleaved(fns: Mapping[str, Callable[[], object]], reference: str,
                     rounds: int = ROUNDS, min_call_s: float = MIN_CALL_S
                     ) -> tuple[dict[str, float], float]:
    """Run ``fns`` in interleaved rounds (rotating order, after a warmup); each timed call
    repeats the function until ``reference`` takes ``min_call_s``. Returns (median per-round
    ratio of each to ``reference``, median seconds of one ``reference`` call)."""
    names = list(fns)
    for fn in fns.values():  # warmup
        fn()
        fn()
    t0 = time.perf_counter()
    fns[reference]()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, min(1000, int(min_call_s / one)))
    ratios: dict[str, list[float]] = {n: [] for n in names}
    ref_times: list[float] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        times = {}
        for n in order:
            fn = fns[n]
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[n] = (time.perf_counter() - t) / reps
        ref_times.append(times[reference])
        for n in names:
            ratios[n].append(times[n] / times[reference])
    return ({n: statistics.median(v) for n, v in ratios.items()},
            statistics.median(ref_times))


def _candidates(space, inv: Inventory, levels: Iterable[float], shares: Iterable[float]
                ) -> dict[str, list[LayerSpec]]:
    from autohybrid.methods import spec_at

    out: dict[str, list[LayerSpec]] = {}
    for layer in space.compressible(inv):
        specs: list[LayerSpec] = []
        for method in space.methods.get(layer.kind, []):
            for level in levels:
                for share in (shares if method == HYBRID else (0.5,)):
                    s = spec_at(layer, method, level, share,
                                factorization=space.factorizations.get(layer.kind),
                                rank_multiple=space.rank_multiple)
                    if s.method != "dense" and s not in specs:
                        specs.append(s)
        out[layer.name] = specs
    return out


def measure_specs(table: LatencyTable, layer: LayerInfo, specs: Iterable[LayerSpec],
                  run: _Runner, batch: int) -> None:
    """Measure every form of each of ``specs`` on ``layer`` into ``table`` (skips measured
    ones)."""
    from autohybrid.methods.dense import dense_module

    x = layer_batch_input(layer, batch)
    g = torch.Generator().manual_seed(1)
    dense = dense_module(layer).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dense_fn = run(dense, x)
    rows = table.rows.setdefault(layer.name, {})
    fams = table.families.setdefault(layer.name, {})
    kept = table.kept.setdefault(layer.name, {})
    dense_times = []
    for spec in specs:
        k = spec_key(spec)
        if k in rows:
            continue
        built = random_module(layer, spec)
        fns = {"__dense__": dense_fn}
        forms = forms_for(layer, spec, run.runtime)
        for form in forms:
            if form != "dense":  # folded: the dense layer's own op, ratio 1 by construction
                fns[form] = run(deploy_module(built, layer, spec, form).eval(), x)
        ratios, t_dense = time_interleaved(fns, "__dense__")
        dense_times.append(t_dense)
        ratios["dense"] = 1.0
        rows[k] = {f: round(ratios[f], 5) for f in forms}
        fams[k] = _family(layer, spec)
        kept[k] = kept_fraction(layer, spec)
    if dense_times or layer.name not in table.dense_s:
        if not dense_times:
            _, t = time_interleaved({"__dense__": dense_fn}, "__dense__")
            dense_times.append(t)
        table.dense_s[layer.name] = statistics.median(dense_times)
    table._curves.clear()


def measure_model_seconds(model: nn.Module, input_size, batch: int, run: _Runner) -> float:
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    _, t = time_interleaved({"model": run(model.eval(), x)}, "model", rounds=ROUNDS)
    return t


def measure_table(model: nn.Module, inv: Inventory, space, *, runtime: str = "torch",
                  threads: int | None = None, batch: int = 1, folder: str | Path,
                  progress: bool | None = True, levels: Iterable[float] | None = None,
                  shares: Iterable[float] | None = None, probe: float = 0.0
                  ) -> LatencyTable:
    """The latency table of ``model``'s compressible layers under ``space`` at ``levels`` /
    ``shares`` (default: the search's), measured, or loaded from ``folder`` where it is
    cached and resumed; ``alpha`` probed at the predicted fraction ``probe`` (the budget)."""
    from autohybrid.search.params import LEVELS, SHARES

    levels, shares = tuple(levels or LEVELS), tuple(shares or SHARES)
    threads = threads or torch.get_num_threads()
    key = table_key(runtime, threads, inv.input_size, batch, inv.fingerprint)
    path = LatencyTable.path_for(Path(folder), key)
    table = LatencyTable.from_dict(json.loads(path.read_text())) if path.is_file() \
        else LatencyTable(key)
    if table.key != key:
        table = LatencyTable(key)
    run = _Runner(runtime, threads)
    if table.model_s:
        with _threads(threads):
            now = measure_model_seconds(model, inv.input_size, batch, run)
        if abs(now / table.model_s - 1.0) > DRIFT:
            import warnings

            warnings.warn(
                f"latency table {path.name}: the dense model takes {1e3 * now:.2f} ms now, "
                f"{1e3 * table.model_s:.2f} ms when the table was measured: this machine "
                "does not run at the speed the table was measured at, so it is measured "
                "again",
                stacklevel=2)
            table = LatencyTable(key)
            table.model_s = now
    candidates = _candidates(space, inv, levels, shares)
    todo = [n for n, specs in candidates.items()
            if n not in table.dense_s or any(spec_key(s) not in table.rows.get(n, {})
                                             for s in specs)]
    def probed() -> bool:
        return table.alpha is not None and table.alpha_at is not None and \
            abs(table.alpha_at - probe) < 0.1 and table.alpha_probe == PROBE

    in_model = runtime != "torch" or set(table.in_model_s) >= set(candidates)
    if not todo and table.model_s and probed() and in_model:
        return table
    t0 = time.time()
    with _threads(threads):
        if not table.model_s:
            table.model_s = measure_model_seconds(model, inv.input_size, batch, run)
        by_name = inv.by_name
        for name in bar(todo, desc=f"latency table ({runtime}, {threads} thr, batch {batch})",
                        progress=progress):
            measure_specs(table, by_name[name], candidates[name], run, batch)
            table.seconds += time.time() - t0
            t0 = time.time()
            table.save(path)
        if runtime == "torch" and (todo or not in_model):
            x = torch.randn(batch, *inv.input_size, generator=torch.Generator().manual_seed(0))
            table.in_model_s = in_model_seconds(model, list(candidates), x)
            table.alpha = None
        if todo or not probed() or table.alpha is None:
            table.alpha, table.alphas = calibrate(table, model, inv, run, probe)
            table.alpha_at, table.alpha_probe = probe, PROBE
            table.seconds += time.time() - t0
    table.save(path)
    return table


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def in_model_seconds(model: nn.Module, names: list[str], x: torch.Tensor,
                     rounds: int = ROUNDS) -> dict[str, float]:
    """Each named layer's time inside whole forwards of ``model`` on ``x`` (forward hooks
    around it; the median over ``rounds`` forwards, after two warmups)."""
    times: dict[str, list[float]] = {n: [] for n in names}
    start: dict[str, float] = {}
    hooks = []
    for n in names:
        mod = model.get_submodule(n)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, n=n: start.__setitem__(n, time.perf_counter())))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, n=n: times[n].append(time.perf_counter() - start[n])))
    was = model.training
    model.eval()
    try:
        model(x)
        model(x)
        for v in times.values():
            v.clear()
        for _ in range(rounds):
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: statistics.median(v) for n, v in times.items() if v}


def probe_layers(table: LatencyTable, inv: Inventory, target: float,
                 method: str | None = None) -> dict[str, LayerSpec]:
    """A probe ``alpha`` is measured on: every layer with a spec (of ``method``, else of any)
    faster than its dense layer, each at the measured spec whose ratio is the nearest at or
    above one common ratio ``r`` (its slowest faster spec where none is that slow), ``r`` the
    largest whose (uncalibrated) prediction reaches ``target`` (0: every layer at its
    fastest).

    Spread over every layer, as the allocations a search returns are. A probe of the few
    layers that save most, each at its fastest spec, gave ViT-tiny at batch 64 an alpha of
    0.83 once and 1.30 twenty minutes later, and a searched model predicted at 0.687 of the
    dense latency measured 0.516."""
    faster: dict[str, list[tuple[float, LayerSpec]]] = {}
    for name, rows in table.rows.items():
        layer = inv.by_name[name]
        specs = [LayerSpec.from_dict(json.loads(k)) for k in rows]
        rs = sorted(((table.ratio(layer, sp), sp) for sp in specs
                     if method is None or sp.method == method), key=lambda t: t[0])
        if rs and rs[0][0] < 1.0:
            faster[name] = [t for t in rs if t[0] < 1.0]

    def at(r: float) -> dict[str, LayerSpec]:
        return {n: next((sp for q, sp in rs if q >= r), rs[-1][1]) for n, rs in faster.items()}

    if target <= 0.0 or table.fraction(inv, at(0.0)) > target:
        return at(0.0)
    lo, hi = 0.0, 1.0  # at(lo) reaches the target, at(hi) (dense-most) may not
    for _ in range(20):
        mid = (lo + hi) / 2
        if table.fraction(inv, at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return at(lo)


def calibrate(table: LatencyTable, model: nn.Module, inv: Inventory, run: _Runner,
              target: float = 0.0) -> tuple[float, dict[str, float]]:
    """``alpha`` per method: a probe of the method's specs (``probe_layers``), its measured
    saving over what the table's sum promised (the median of ``REPEATS`` interleaved
    timings). Methods differ: on ViT-tiny at batch 64 a probe of CSR / BSR layers at 93-97 %
    zeros, each 0.5x its dense layer alone, ran at 0.92x the dense model, while chains of
    the same promised saving ran at 0.6x. Returns the default for a method with no probe of
    its own (the largest-saving method's alpha; 1 when nothing saves 2 % of the dense time)
    and the per-method ones."""
    table.alpha, table.alphas = 1.0, {}
    x = torch.randn(table.key["batch"], *inv.input_size,
                    generator=torch.Generator().manual_seed(0))
    dense = run(model.eval(), x)
    methods = sorted({json.loads(k)["method"] for rows in table.rows.values() for k in rows})
    alphas, promised = {}, {}
    for method in methods:
        layers = probe_layers(table, inv, target, method)
        saved = table.model_s - table.predict(inv, layers)
        if saved < 0.02 * table.model_s:
            continue
        probe = random_model(model, inv, layers, best_forms(table, inv, layers))
        fns = {"dense": dense, "probe": run(probe, x)}
        ratio = statistics.median(time_interleaved(fns, "dense", rounds=ROUNDS)[0]["probe"]
                                  for _ in range(REPEATS))
        alphas[method] = float(min(5.0, max(0.2, table.model_s * (1.0 - ratio) / saved)))
        promised[method] = saved
    default = alphas[max(promised, key=promised.get)] if alphas else 1.0
    return default, alphas


def measure_model(model: nn.Module, dense: nn.Module, input_size, batch: int,
                  runtime: str = "torch", threads: int | None = None,
                  rounds: int = 15, repeats: int = 1) -> dict:
    """``model``'s time beside ``dense``'s, interleaved: {'ratio', 'ms', 'dense_ms'}; with
    ``repeats``, the median of that many measurements (one moves by a few percent)."""
    threads = threads or torch.get_num_threads()
    with _threads(threads):
        run = _Runner(runtime, threads)
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
        fns = {"dense": run(dense.eval(), x), "model": run(model.eval(), x)}
        runs = [time_interleaved(fns, "dense", rounds=rounds) for _ in range(max(1, repeats))]
    ratio = statistics.median(r["model"] for r, _ in runs)
    t_dense = statistics.median(t for _, t in runs)
    return {"ratio": ratio, "ms": 1e3 * t_dense * ratio, "dense_ms": 1e3 * t_dense,
            "batch": batch, "runtime": runtime, "threads": threads}


# -- whole models: the forms to export, speed beside the dense model --------------------------


def best_forms(table: LatencyTable, inv: Inventory, layers: Mapping[str, LayerSpec],
               progress: bool | None = False) -> dict[str, str]:
    """Each compressed layer's fastest form on the table's runtime; a spec the table has not
    measured (between its levels) is measured now, so the form is never slower than the one
    the table timed."""
    key = table.key
    run = _Runner(key["runtime"], key["threads"])
    by_name = inv.by_name
    missing = [n for n, s in layers.items()
               if s.method != "dense" and table.forms(n, s) is None]
    if missing:
        with _threads(key["threads"]):
            for n in bar(missing, desc="latency of the chosen specs", progress=progress):
                measure_specs(table, by_name[n], [layers[n]], run, key["batch"])
    return {n: table.best_form(n, s)[0] for n, s in layers.items() if s.method != "dense"}


def random_model(model: nn.Module, inv: Inventory, layers: Mapping[str, LayerSpec],
                 forms: Mapping[str, str] | None = None) -> nn.Module:
    """``model`` with ``layers`` replaced by random-valued modules of their specs in their
    forms: a model that runs exactly as the compressed one does, without fitting it."""
    import copy

    from autohybrid.deploy import deploy

    out = copy.deepcopy(model).eval()
    for i, (name, spec) in enumerate(layers.items()):
        if spec.method != "dense":
            out.set_submodule(name, random_module(inv.by_name[name], spec, seed=i))
    return deploy(out, layers, forms or {}, inv)


def speed(model: nn.Module, dense: nn.Module, input_size, batches: Iterable[int],
          runtime: str = "torch", threads: int | None = None) -> dict:
    """``model``'s measured time beside ``dense``'s at each batch: columns
    ``latency_ratio_b{N}`` and ``latency_ms_b{N}``."""
    out: dict = {}
    for b in batches:
        m = measure_model(model, dense, input_size, b, runtime, threads)
        out[f"latency_ratio_b{b}"] = round(m["ratio"], 4)
        out[f"latency_ms_b{b}"] = round(m["ms"], 4)
        out[f"dense_ms_b{b}"] = round(m["dense_ms"], 4)
    return out


def measure_export(path: str | Path, batches: Iterable[int], runtime: str = "torch",
                   threads: int = 1, repeats: int = REPEATS) -> dict:
    """Time an exported model (``export``) in its recorded deploy forms beside the dense
    architecture it was made from, in fresh Python processes; returns ``speed``'s columns,
    each the median of ``repeats`` processes (on a shared machine one measurement of a
    whole model moves by a few percent)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "autohybrid.latency", str(path), "--runtime", runtime,
           "--threads", str(threads), "--batches", *map(str, batches)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = []
    for _ in range(max(1, repeats)):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"timing {path} in a fresh process failed: {tail[0]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _main(argv=None) -> int:
    """``python -m autohybrid.latency EXPORT_DIR``: the fresh-process timing of
    ``measure_export`` (prints one JSON line)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m autohybrid.latency")
    p.add_argument("path")
    p.add_argument("--runtime", default="torch", choices=RUNTIMES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from autohybrid.export import load
    from autohybrid.models import create_model

    model = load(args.path, deploy=True)
    from autohybrid.allocation import Allocation
    from autohybrid.export import ALLOCATION

    ident = Allocation.load(Path(args.path) / ALLOCATION).model
    dense = create_model(ident.get("name"), num_classes=ident.get("num_classes"),
                         **(ident.get("kwargs") or {})).eval()
    size = tuple(ident.get("input_size"))
    print(json.dumps(speed(model, dense, size, args.batches, args.runtime, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
