"""Layer input statistics: ``H = X^T X`` of every compressible layer's inputs, a stage output.

One pass of the calibration images through the dense model, with a forward pre-hook on each
layer, accumulates (in float64, batch by batch) the second moment of what the layer multiplies
its weight with: unfolded patches for a conv (its own padding, stride and dilation applied,
one ``H`` per group for grouped and depthwise convs), tokens for a Linear. Only plain
``nn.Conv2d`` / ``nn.Linear`` layers are replaced (the inventory marks the rest unsupported;
timm's ``Conv2dSame``, which pads inside its forward, among them), so the pre-hook's input is
exactly what the weight sees.

The result is cached as safetensors next to the sensitivity table, keyed like it (layer
fingerprint, weights, calibration images, layers), so a rerun reads it back.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autohybrid.inventory import Inventory, LayerInfo
from autohybrid.io import atomic_path
from autohybrid.progress import bar as progress_bar

__all__ = ["LayerStats", "layer_rows", "collect_stats", "input_stats", "images_digest"]


@dataclass
class LayerStats:
    """Second moments of each layer's inputs over ``n`` calibration images.

    ``h[name]`` is (G, k, k) float64: ``k`` = in_chs / groups * kh * kw for a conv, in_chs for
    a Linear; ``rows[name]`` is how many input rows (patches, tokens) it summed.
    """

    h: dict[str, torch.Tensor]
    rows: dict[str, int]
    meta: dict = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.h

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.h.values())

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        meta = {"rows": json.dumps(self.rows), "meta": json.dumps(self.meta)}
        with atomic_path(Path(path)) as tmp:
            save_file({k: v.contiguous() for k, v in self.h.items()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LayerStats:
        from safetensors import safe_open

        h = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                h[k] = f.get_tensor(k)
        return cls(h, json.loads(meta.get("rows", "{}")), json.loads(meta.get("meta", "{}")))


def layer_rows(layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies: (rows, G, k) for input batch ``x``."""
    if not layer.is_conv:
        return x.reshape(-1, 1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    k = cols.shape[1] // layer.groups
    return cols.transpose(1, 2).reshape(-1, layer.groups, k)


def moment(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_rows a^T b`` per group: (rows, G, k) x (rows, G, k) -> (G, k, k) float64.

    One batch's product is taken in the inputs' precision (float32 BLAS, twice as fast as
    float64 and no copy); batches are summed in float64, so the total over many batches
    keeps float64 accuracy."""
    b = a if b is None else b
    if a.shape[1] == 1:
        return (a[:, 0].T @ b[:, 0]).unsqueeze(0).double()
    return torch.einsum("ngk,ngl->gkl", a, b).double()


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    inv: Inventory,
    layers: Sequence[str],
    images: torch.Tensor,
    batch_size: int = 64,
    progress: bool | None = None,
) -> LayerStats:
    """``H`` of each layer in ``layers`` over ``images`` (preprocessed), one forward pass."""
    h: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    for name in layers:
        layer = inv[name]

        def hook(mod, args, name=name, layer=layer):
            r = layer_rows(layer, args[0])
            h[name] = h[name] + moment(r) if name in h else moment(r)
            rows[name] = rows.get(name, 0) + r.shape[0]

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        bar = progress_bar(images.split(batch_size), desc="input statistics", unit="batch",
                           progress=progress, leave=False)
        for xb in bar:
            model(xb)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    short = [(name, rows[name], h[name].shape[-1]) for name in layers
             if name in h and rows[name] < h[name].shape[-1]]
    if short:
        name, n, k = min(short, key=lambda s: s[1] / s[2])
        warnings.warn(
            f"{len(short)} layer(s) saw fewer calibration rows than input columns (fewest: "
            f"{name}, {n} rows for {k} columns); the damping carries their fit, more "
            "calibration images (--calib) would fit them better",
            stacklevel=3,
        )
    return LayerStats(h, rows)


def images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def input_stats(
    model: nn.Module,
    inv: Inventory,
    layers: Sequence[str],
    images: torch.Tensor,
    out_dir: str | Path | None = None,
    key_extra: dict | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> LayerStats:
    """``collect_stats`` cached in ``out_dir/stats-KEY.safetensors``; prints time and memory.

    The key is the layer fingerprint, the weights, the calibration images and the layers, as
    the sensitivity table's (so the two are computed from, and reused for, the same data)."""
    from autohybrid.sensitivity import model_digest

    key_doc = {
        "fingerprint": inv.fingerprint, "weights": model_digest(model),
        "images": images_digest(images), "layers": list(layers), "n": len(images),
        **(key_extra or {}),
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(out_dir) / f"stats-{key}.safetensors" if out_dir is not None else None
    if path is not None and path.is_file():
        stats = LayerStats.load(path)
        stats.meta["cached"] = True
        return stats
    t0 = time.time()
    stats = collect_stats(model, inv, layers, images, batch_size, progress)
    stats.meta = {"key": key, **key_doc, "seconds": round(time.time() - t0, 2),
                  "bytes": stats.nbytes()}
    if progress is not False:
        tqdm.write(f"input statistics: {len(layers)} layers, {len(images)} images, "
                   f"{stats.nbytes() / 2**20:.1f} MiB, {time.time() - t0:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats
