"""Which sparse layouts a CPU runs faster than the dense matmul they replace, on this machine.

For the matrix shapes of the shared models' Linear and 1x1 layers (weight out x in, times the
activations in x N columns: tokens or pixels, times the batch), torch's CPU kernels at one
thread: dense ``W @ X`` against ``torch.sparse`` CSR (unstructured) and BSR (block-sparse,
blocks 1x4, 4x4 and 8x8: whole blocks kept or dropped, the layout that keeps a kernel's
vector lanes full), at 50 / 80 / 90 / 95 % zeros. Each pair timed interleaved (the median of
per-round ratios, as ``autohybrid.latency`` times layers). A ratio below 1 is a sparse
layout that pays.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_kernels.py
"""

from __future__ import annotations

import time
import warnings

import _common  # first: records the caller's thread settings
import torch

from autohybrid.latency import time_interleaved

SHAPES = {  # (out, in, columns at batch 1), from the shared checkpoints
    "ViT tiny fc1 (192->768, 65 tokens)": (768, 192, 65),
    "ViT tiny fc2 (768->192, 65 tokens)": (192, 768, 65),
    "MobileNetV3 1x1 (96->576, 2x2 px)": (576, 96, 4),
    "EfficientNet-Lite0 1x1 (192->1152, 2x2 px)": (1152, 192, 4),
    "EfficientNet-Lite0 1x1 (40->240, 8x8 px)": (240, 40, 64),
}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
LAYOUTS = ("csr", "bsr1x4", "bsr4x4", "bsr8x8")


def sparse_weight(out: int, inp: int, sparsity: float, layout: str, g) -> torch.Tensor:
    w = torch.randn(out, inp, generator=g)
    if layout == "csr":
        keep = torch.rand(out, inp, generator=g) >= sparsity
        return (w * keep).to_sparse_csr()
    bh, bw = (int(v) for v in layout[3:].split("x"))
    blocks = torch.rand(out // bh, inp // bw, generator=g) >= sparsity
    mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (w * mask).to_sparse_bsr((bh, bw))


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "Sparse (CSR|BSR) tensor support is in beta")
    t0, load0 = time.time(), _common.load_average()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (out, inp, cols) in SHAPES.items():
        for batch in (1, 64):
            x = torch.randn(inp, cols * batch, generator=g)
            dense = torch.randn(out, inp, generator=g)
            for s in SPARSITIES:
                fns = {"dense": lambda d=dense, x=x: d @ x}
                for layout in LAYOUTS:
                    try:
                        w = sparse_weight(out, inp, s, layout, g)
                        w @ x
                    except RuntimeError as e:
                        print(f"{name} {layout}: {e}".splitlines()[0], flush=True)
                        continue
                    fns[layout] = lambda w=w, x=x: w @ x
                ratios, t = time_interleaved(fns, "dense", rounds=9)
                rows.append([name, batch, f"{s:.0%}", f"{1e3 * t:.3f}",
                             *(f"{ratios[k]:.2f}" if k in ratios else "–" for k in LAYOUTS)])
                print(rows[-1], flush=True)
    body = "\n".join([
        "Sparse layouts against the dense matmul they replace (torch CPU kernels, one thread; "
        "ratio = sparse time / dense time, median of 9 interleaved rounds; below 1 pays):",
        "",
        _common.table(["matrix", "batch", "zeros", "dense ms", *LAYOUTS], rows),
        "",
        _common.provenance(time.time() - t0, (load0, _common.load_average())),
    ])
    _common.write_section("Sparse kernels on this CPU", body,
                          _common.BENCH_DIR / "RESULTS_latency.md")


if __name__ == "__main__":
    main()
