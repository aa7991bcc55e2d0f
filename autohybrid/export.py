"""export / load: safetensors weights + the allocation file; ONNX for deployment.

Sparse branches are stored compactly (values plus a bitmask or int32 indices, whichever is
smaller), so the file size tracks the budget.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from autohybrid.allocation import Allocation
from autohybrid.apply import skeleton
from autohybrid.exceptions import CheckpointError
from autohybrid.io import atomic_path
from autohybrid.layers import _SparseBase
from autohybrid.methods.sparse import index_bytes

__all__ = ["export", "load", "export_onnx", "WEIGHTS", "ALLOCATION"]

WEIGHTS = "model.safetensors"
ALLOCATION = "allocation.yaml"


def _pack(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.detach().contiguous() for k, v in state.items()}
    for name, m in model.named_modules():
        if not isinstance(m, _SparseBase):
            continue
        idx = out.pop(f"{name}.indices")
        numel = math.prod(m.shape)
        if torch.any(idx[1:] <= idx[:-1]):
            order = idx.argsort()
            idx, out[f"{name}.values"] = idx[order], out[f"{name}.values"][order]
        if index_bytes(numel, idx.numel()) < 4 * idx.numel():
            mask = np.zeros(numel, dtype=bool)
            mask[idx.numpy()] = True
            out[f"{name}.mask"] = torch.from_numpy(np.packbits(mask))
        else:
            out[f"{name}.idx32"] = idx.to(torch.int32)
    return out


def _unpack(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    for name, m in model.named_modules():
        if not isinstance(m, _SparseBase):
            continue
        if f"{name}.mask" in tensors:
            bits = np.unpackbits(tensors.pop(f"{name}.mask").numpy())[: math.prod(m.shape)]
            tensors[f"{name}.indices"] = torch.from_numpy(np.flatnonzero(bits)).long()
        elif f"{name}.idx32" in tensors:
            tensors[f"{name}.indices"] = tensors.pop(f"{name}.idx32").long()
    return tensors


def export(model: nn.Module, alloc: Allocation, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``allocation.yaml`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    alloc = copy.deepcopy(alloc)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    alloc.model["preprocessing"] = {
        k: list(cfg[k]) for k in ("mean", "std", "input_size") if k in cfg
    }
    tensors = _pack(model.state_dict(), model)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "autohybrid", "version": "1"})
    alloc.save(out_dir / ALLOCATION)
    return out_dir


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild an exported model: the dense architecture (from timm by the allocation's
    model identity, or ``model`` if given), the allocation's structure, the saved values."""
    path = Path(path)
    weights, alloc_file = path / WEIGHTS, path / ALLOCATION
    for f in (weights, alloc_file):
        if not f.is_file():
            raise CheckpointError(
                f"{f} not found; point at a folder written by `autohybrid apply`"
            )
    alloc = Allocation.load(alloc_file)
    if model is None:
        from autohybrid.models import create_model

        ident = alloc.model
        model = create_model(
            ident.get("name"), num_classes=ident.get("num_classes"), **(ident.get("kwargs") or {})
        )
        pre = ident.get("preprocessing") or {}
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        cfg.update({k: tuple(v) for k, v in pre.items()})
        model.pretrained_cfg = model.default_cfg = cfg
    model = skeleton(model, alloc)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    state = _unpack(tensors, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its allocation: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; re-export the model"
        )
    model.eval()
    return model


def export_onnx(model: nn.Module, path: str | Path, input_size, batch: int = 1) -> Path:
    """Export to ONNX (dynamic batch) atomically."""
    model = model.eval()
    x = torch.zeros(batch, *input_size)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return Path(path)
