"""Equal-cost sparse -> low-rank+sparse swaps on top of global magnitude pruning.

Question: does the hybrid help where the search only ever returns its global-magnitude warm
start (benchmarks/RESULTS.md)? Start from the global-magnitude allocation (one |w| threshold)
of the shared CIFAR-10 ResNet-20 at a params budget. For every layer, replace its sparse spec
by tucker2 (r, r) + a sparse residual with no more parameters, and measure the calibration KL
(512 train images) of the whole model against the dense one. Then apply the best improving
swap of every layer at once, and compare test top-1 (full CIFAR-10 test split, no fine-tune)
with plain global magnitude, both measured in this run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hybrid_swaps.py 0.3

Needs ../shared (CIFAR-10 and the ResNet-20 checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from autohybrid.cost import allocation_cost, layer_cost
from autohybrid.data import as_tensors, load_data
from autohybrid.evaluate import evaluate
from autohybrid.inventory import inventory
from autohybrid.models import create_model
from autohybrid.search.objective import Evaluator
from autohybrid.search.params import ParamSpace, group_layers
from autohybrid.search.warm_start import global_magnitude
from autohybrid.search_space import load_search_space
from autohybrid.spec import LayerSpec

SHARED = Path(__file__).resolve().parents[2] / "shared"
RANK_RATIOS = (0.03, 0.06, 0.12)  # of min(C_in, C_out)


def hybrid_at(layer, params: int, r: int) -> LayerSpec | None:
    """tucker2 (r, r) + the sparsest residual whose params do not exceed ``params``."""
    lo, hi = 0.0, 0.9999
    for _ in range(30):
        mid = (lo + hi) / 2
        spec = LayerSpec("lowrank+sparse", factorization="tucker2", rank=(r, r), sparsity=mid)
        lo, hi = (mid, hi) if layer_cost(layer, spec).params > params else (lo, mid)
    spec = LayerSpec("lowrank+sparse", factorization="tucker2", rank=(r, r), sparsity=hi)
    return spec if layer_cost(layer, spec).params <= params else None


def main(budget: float) -> None:
    torch.set_num_threads(1)
    model = create_model("cifar_resnet20",
                         checkpoint=str(SHARED / "models/cifar10/resnet20-12fca82f.th")).eval()
    inv = inventory(model, (3, 32, 32))
    data = load_data(f"cifar10:{SHARED / 'data/cifar10'}", model, input_size=(3, 32, 32))
    x, y = as_tensors(data.calibration(512, seed=0))
    space = load_search_space("cifar_resnet20", None)
    ps = ParamSpace(space, inv, group_layers(space, inv, None, 10**9, 0), "params")
    magnitude = global_magnitude(ps, model, budget)
    ev = Evaluator(model, inv, x, y, bn_recal=False)
    base = ev.score(magnitude)["kl"]
    print(f"global magnitude at {budget} params: calibration KL {base:.4f}", flush=True)

    best: dict[str, tuple[float, LayerSpec]] = {}
    tried = 0
    for name, spec in magnitude.items():
        layer = inv[name]
        for ratio in RANK_RATIOS:
            r = max(1, round(ratio * min(layer.in_chs, layer.out_chs)))
            swap = hybrid_at(layer, layer_cost(layer, spec).params, r)
            if swap is None:
                continue
            kl = ev.score({**magnitude, name: swap})["kl"]
            tried += 1
            print(f"{name:16s} sparse {spec.sparsity:.3f} -> tucker2 r={r} + sparse "
                  f"{swap.sparsity:.3f}: KL {kl:.4f} ({kl - base:+.4f})", flush=True)
            if kl < base and kl < best.get(name, (float("inf"),))[0]:
                best[name] = (kl, swap)
    print(f"{sum(1 for _ in best)} of {len(magnitude)} layers have an improving swap "
          f"({tried} swaps tried)")
    combined = {**magnitude, **{n: s for n, (_, s) in best.items()}}
    kl = ev.score(combined)["kl"]
    print(f"all {len(best)} best swaps together: calibration KL {kl:.4f} vs {base:.4f} "
          f"(ratio {kl / base:.3f}); params fraction "
          f"{allocation_cost(inv, combined).params_fraction:.4f} vs "
          f"{allocation_cost(inv, magnitude).params_fraction:.4f}", flush=True)
    for label, layers in (("global magnitude", magnitude), ("+ equal-cost swaps", combined)):
        top1 = evaluate(ev.build(layers)[0], data.test, progress=False)["top1"]
        print(f"test top-1, 10,000 images, no fine-tune, {label}: {top1:.2f} %", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.3)
