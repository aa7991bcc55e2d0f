"""Feasibility check: ExecuTorch (+ XNNPACK delegate) as a third runtime next to torch eager.

Not part of the autohybrid package and not imported by it; it needs its own venv
because `executorch` pulls in ~50 extra packages (torchao, coremltools, pandas, ...):

    python3 -m venv /work/et_venv
    /work/et_venv/bin/pip install -q --upgrade pip
    /work/et_venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    /work/et_venv/bin/pip install executorch          # -> executorch 1.5.1, torch left at 2.14.1

Run (single-threaded on both sides, in one process, timings interleaved):

    OMP_NUM_THREADS=1 /work/et_venv/bin/python benchmarks/executorch_check.py

For every case it exports with torch.export.export ->
executorch.exir.to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]) ->
to_executorch(), loads the .pte with executorch.runtime.Runtime and executes it,
checks parity (max abs diff vs. torch eager) and times median-of-30 samples
(each sample = mean over `inner` calls, after warm-up) against torch eager with
torch.set_num_threads(1) and the ExecuTorch threadpool reset to 1 thread.
The "*_sp90" cases use the same layer with 90 % of the weights set to zero
(unstructured) to see whether XNNPACK under ExecuTorch exploits sparsity; case "f" exports a
copy of autohybrid.layers.SparseConv2d (weight scattered from values/indices in forward) as is.
Keep the Program object alive while using its Method (dropping it segfaults).
Prints a markdown table; `--json PATH` also writes the raw numbers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from executorch.exir.backend.utils import get_delegates, get_non_lowered_nodes
from executorch.runtime import Runtime

try:
    from executorch.version import __version__ as ET_VERSION
except Exception:  # pragma: no cover
    ET_VERSION = "unknown"


def sparsify_(module: nn.Module, frac: float, seed: int = 0) -> nn.Module:
    """Zero `frac` of every conv/linear weight (unstructured, random mask)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                mask = torch.rand(m.weight.shape, generator=g) >= frac
                m.weight.mul_(mask)
    return module


class ScatterSparseConv2d(nn.Module):
    """Same forward as autohybrid.layers.SparseConv2d: nonzero `values` at flat `indices`,
    scattered into a dense weight on every call (copied so that this script needs no
    autohybrid import)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach()
        self.shape = tuple(w.shape)
        flat = w.flatten()
        idx = flat.nonzero().squeeze(1)
        self.values = nn.Parameter(flat[idx].clone())
        self.register_buffer("indices", idx)
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.padding = conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in self.shape:
            numel *= d
        w = self.values.new_zeros(numel).scatter(0, self.indices, self.values).view(self.shape)
        return torch.nn.functional.conv2d(x, w, self.bias, 1, self.padding)


def make_cases():
    torch.manual_seed(0)
    cases = [
        ("a_conv3x3_64", nn.Conv2d(64, 64, 3, padding=1), (1, 64, 32, 32)),
        ("b_conv1x1_96", nn.Conv2d(96, 96, 1), (1, 96, 16, 16)),
        (
            "c_lowrank_64-16-16-64",
            nn.Sequential(
                nn.Conv2d(64, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 64, 1)
            ),
            (1, 64, 32, 32),
        ),
        ("d_linear_384x1536", nn.Linear(384, 1536), (1, 65, 384)),
        ("e_tiny_conv1x1_8 (call overhead)", nn.Conv2d(8, 8, 1), (1, 8, 4, 4)),
    ]
    torch.manual_seed(1)
    a_sp = nn.Conv2d(64, 64, 3, padding=1)
    a_sp.load_state_dict(cases[0][1].state_dict())
    b_sp = nn.Conv2d(96, 96, 1)
    b_sp.load_state_dict(cases[1][1].state_dict())
    cases.append(("a_conv3x3_64_sp90", sparsify_(a_sp, 0.9), (1, 64, 32, 32)))
    cases.append(("b_conv1x1_96_sp90", sparsify_(b_sp, 0.9), (1, 96, 16, 16)))
    cases.append(
        (
            "f_scatter_sparse_conv3x3_sp90 (autohybrid-style)",
            ScatterSparseConv2d(a_sp),
            (1, 64, 32, 32),
        )
    )
    return [(n, m.eval(), s) for n, m, s in cases]


def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(":")[0].strip()


def lower(module: nn.Module, x: torch.Tensor):
    ep = torch.export.export(module, (x,))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    gm = edge.exported_program().graph_module
    n_delegates = len(get_delegates(gm.graph))
    leftover = sorted({_op_name(n.target) for n in get_non_lowered_nodes(gm.graph)})
    et_prog = edge.to_executorch()
    return et_prog.buffer, n_delegates, leftover


def timed(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--target-ms", type=float, default=5.0, help="approx. duration of one timing sample"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)
    et_threads = portable_lib._threadpool_get_thread_count()

    rt = Runtime.get()
    print(
        f"python {platform.python_version()}  torch {torch.__version__}  executorch {ET_VERSION}"
    )
    print(f"torch threads {torch.get_num_threads()}  ET threadpool threads {et_threads}")
    print(f"ET backends: {rt.backend_registry.registered_backend_names}")

    rows = []
    tmpdir = Path(tempfile.mkdtemp(prefix="et_check_"))
    for name, module, shape in make_cases():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = module(x)
        buf, n_del, leftover = lower(module, x)
        pte = tmpdir / f"{name.split()[0]}.pte"
        pte.write_bytes(buf)
        program = rt.load_program(pte)
        method = program.load_method("forward")
        out = method.execute([x])[0]
        maxdiff = (out - ref).abs().max().item()

        def run_torch(module=module, x=x):
            with torch.no_grad():
                module(x)

        def run_et(method=method, x=x):
            method.execute([x])

        for _ in range(args.warmup):
            run_torch()
            run_et()
        one = max(timed(run_torch, 3), timed(run_et, 3))
        inner = max(1, int(args.target_ms / 1e3 / max(one, 1e-7)))
        t_torch, t_et = [], []
        for _ in range(args.runs):  # interleaved
            t_torch.append(timed(run_torch, inner))
            t_et.append(timed(run_et, inner))
        mt, me = statistics.median(t_torch), statistics.median(t_et)
        row = dict(
            case=name,
            shape=list(shape),
            delegates=n_del,
            non_delegated_ops=leftover,
            pte_bytes=len(buf),
            max_abs_diff=maxdiff,
            torch_ms=mt * 1e3,
            et_ms=me * 1e3,
            ratio_et_over_torch=me / mt,
            inner=inner,
        )
        rows.append(row)
        print(
            f"{name:34s} deleg={n_del} left={leftover} pte={len(buf) / 1024:.0f}KiB "
            f"diff={maxdiff:.2e} torch={mt * 1e3:.4f}ms et={me * 1e3:.4f}ms ratio={me / mt:.2f}",
            flush=True,
        )

    print()
    print(
        "| case | input | delegated (XNNPACK subgraphs / leftover ops) | .pte KiB "
        "| max abs diff | torch eager ms | ExecuTorch ms | ET/torch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        left = ", ".join(r["non_delegated_ops"]) or "none"
        print(
            f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['delegates']} / {left} | "
            f"{r['pte_bytes'] / 1024:.0f} | {r['max_abs_diff']:.1e} | {r['torch_ms']:.4f} | "
            f"{r['et_ms']:.4f} | {r['ratio_et_over_torch']:.2f} |"
        )
    by = {r["case"]: r for r in rows}
    for dense, sp in (
        ("a_conv3x3_64", "a_conv3x3_64_sp90"),
        ("b_conv1x1_96", "b_conv1x1_96_sp90"),
    ):
        print(
            f"sparse/dense time, {dense}: ET {by[sp]['et_ms'] / by[dense]['et_ms']:.2f}  "
            f"torch {by[sp]['torch_ms'] / by[dense]['torch_ms']:.2f}  "
            f"(.pte bytes {by[sp]['pte_bytes']} vs {by[dense]['pte_bytes']})"
        )
    if args.json:
        args.json.write_text(
            json.dumps(dict(torch=torch.__version__, executorch=ET_VERSION, rows=rows), indent=2)
        )


if __name__ == "__main__":
    main()
