"""export / load: safetensors weights + the allocation file; ONNX for deployment.

Sparse branches are stored compactly (values plus a bitmask or int32 indices, whichever is
smaller), so the file size tracks the budget.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from autohybrid.allocation import Allocation
from autohybrid.apply import model_inventory, skeleton
from autohybrid.exceptions import AutohybridError, CheckpointError, ModelError
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
    """Write ``model.safetensors`` and ``allocation.yaml`` into ``out_dir`` (atomically).

    For a timm model the allocation records the kwargs that rebuild its architecture (those
    it was created with, else recovered from the model: ``img_size``, ``depth``, ...), checked
    by rebuilding it on the meta device; ``ModelError`` if no kwargs rebuild it.
    """
    out_dir = Path(out_dir)
    alloc = copy.deepcopy(alloc)
    kwargs = creation_kwargs(model, alloc)
    if kwargs is not None:
        alloc.model["kwargs"] = kwargs
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = {k: list(cfg[k]) for k in ("mean", "std", "input_size") if k in cfg}
    if kwargs and "img_size" in kwargs:  # timm leaves its default size in pretrained_cfg
        from autohybrid.models import _input_size

        pre["input_size"] = list(_input_size(kwargs["img_size"], kwargs.get("in_chans", 3)))
    elif kwargs and "in_chans" in kwargs and "input_size" in pre:
        pre["input_size"] = [kwargs["in_chans"], *pre["input_size"][1:]]
    alloc.model["preprocessing"] = pre
    tensors = _pack(model.state_dict(), model)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "autohybrid", "version": "1"})
    alloc.save(out_dir / ALLOCATION)
    return out_dir


# -- the kwargs that rebuild a model's architecture ------------------------------------------


def _observed_kwargs(model: nn.Module) -> dict[str, Any]:
    """Creation kwargs a model's attributes show, for those its class's __init__ takes."""
    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    pe = getattr(model, "patch_embed", None)
    for key in ("img_size", "patch_size"):
        value = getattr(pe, key, None)
        if key in params and isinstance(value, (int, tuple, list)) and value:
            value = [int(v) for v in value] if isinstance(value, (tuple, list)) else int(value)
            out[key] = value[0] if isinstance(value, list) and len(set(value)) == 1 else value
    if "in_chans" in params:
        chans = getattr(model, "in_chans", None)
        if not isinstance(chans, int):
            first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
            try:
                chans = model.get_submodule(first).in_channels if isinstance(first, str) else None
            except AttributeError:
                chans = None
        if isinstance(chans, int):
            out["in_chans"] = chans
    blocks = getattr(model, "blocks", None)
    if pe is not None and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        if "depth" in params:
            out["depth"] = len(blocks)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
        if "num_heads" in params and isinstance(heads, int):
            out["num_heads"] = heads
    if "embed_dim" in params and isinstance(getattr(model, "embed_dim", None), int):
        out["embed_dim"] = model.embed_dim
    return out


_PLAIN = (int, float, bool, str, type(None))
_RUNTIME_FLAGS = ("training", "grad_checkpointing")


def _first_line(error: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _structure(model: nn.Module) -> dict[str, Any]:
    """What a rebuild must reproduce: parameter and buffer shapes, module types and their
    plain attributes (``global_pool``, ``num_heads``, ...; dropout rates left out)."""
    out: dict[str, Any] = {f"tensor {k}": tuple(v.shape) for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        out[f"module {name or '<model>'}"] = type(m).__name__
        if "Drop" in type(m).__name__:
            continue
        for key, value in vars(m).items():
            if key.startswith("_") or key in _RUNTIME_FLAGS or "drop" in key:
                continue
            if isinstance(value, _PLAIN) or (
                isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
            ):
                out[f"{name or '<model>'}.{key}"] = value
    return out


def _rebuild_problem(
    name: str, num_classes, kwargs: dict, alloc: Allocation, want: dict[str, Any]
) -> tuple[str | None, bool, dict[str, Any]]:
    """Rebuild the exported structure without weights (meta device). Returns the first
    difference from ``want`` (None if none), whether it is only in a plain attribute (the
    shapes, module types and layer fingerprint agree), and the observed kwargs of the dense
    rebuild ({} if it did not build)."""
    from autohybrid.models import create_model

    observed: dict[str, Any] = {}
    try:
        with torch.device("meta"):
            dense = create_model(name, num_classes=num_classes, **kwargs)
            observed = _observed_kwargs(dense)
            inv = model_inventory(dense, alloc)
            if inv.fingerprint != alloc.fingerprint:
                why = f"layer fingerprint {inv.fingerprint}, the allocation's {alloc.fingerprint}"
                return why, False, observed
            got = _structure(skeleton(dense, alloc, inv))
    except Exception as e:  # noqa: BLE001 - any failure to rebuild is the answer
        return f"{type(e).__name__}: {_first_line(e)}", False, observed
    for key in sorted(want.keys() | got.keys()):
        if key.startswith(("tensor ", "module ")) and want.get(key) != got.get(key):
            why = f"{key}: {got.get(key, '<absent>')} vs {want.get(key, '<absent>')}"
            return why, False, observed
    for key in sorted(want.keys() & got.keys()):  # attributes only set on one side don't count
        if want[key] != got[key]:
            return f"{key}: {got[key]!r} vs {want[key]!r}", True, observed
    return None, False, observed


def creation_kwargs(model: nn.Module, alloc: Allocation) -> dict[str, Any] | None:
    """The kwargs that rebuild ``model`` by the allocation's timm name: the recorded ones if
    they do, else those completed from the model's attributes; None for a non-timm model
    (``load`` then needs the model passed in).

    Raises ``ModelError`` if no kwargs rebuild it, except where the kwargs are known
    (``model.autohybrid_kwargs``) and only a plain attribute differs: a warning then.
    """
    import timm

    name = alloc.model.get("name")
    if not isinstance(name, str) or not timm.is_model(name):
        return None
    num_classes = alloc.model.get("num_classes")
    recorded = dict(alloc.model.get("kwargs") or {})
    known = bool(recorded) or hasattr(model, "autohybrid_kwargs")
    want = _structure(model)
    problem, attr_only, default = _rebuild_problem(name, num_classes, recorded, alloc, want)
    if problem is None:
        return recorded
    if not default:  # the recorded kwargs do not build: compare with timm's defaults
        from autohybrid.models import create_model

        try:
            with torch.device("meta"):
                default = _observed_kwargs(create_model(name, num_classes=num_classes))
        except AutohybridError:
            default = {}
    found = {k: v for k, v in _observed_kwargs(model).items() if default.get(k) != v}
    kwargs = {**recorded, **found}
    if found:
        problem, attr_only, _ = _rebuild_problem(name, num_classes, kwargs, alloc, want)
        if problem is None:
            return kwargs
    if known and attr_only:
        warnings.warn(
            f"export {name!r}: rebuilt with kwargs {kwargs} it differs from this model in "
            f"{problem}; `load(path)` may not reproduce it, `load(path, model=...)` does",
            stacklevel=3,
        )
        return kwargs
    what = "rebuilt with" if known else "the kwargs it was created with are unknown, and with"
    raise ModelError(
        f"cannot export {name!r}: {what} {kwargs} it differs from this model ({problem}); "
        f"create it with autohybrid.create_model({name!r}, num_classes={num_classes}, "
        "**kwargs) or set model.autohybrid_kwargs to the kwargs given to timm.create_model, "
        "then export again"
    )


def load(path: str | Path, model: nn.Module | None = None, deploy: bool = False) -> nn.Module:
    """Rebuild an exported model: the dense architecture (from timm by the allocation's
    model identity, or ``model`` if given), the allocation's structure, the saved values.

    ``deploy=True`` converts each compressed layer into the form recorded at export (the
    fastest measured on the latency table's runtime: a sparse part precomputed or CSR, L+S
    folded into one weight, ...; ``autohybrid.deploy``), for inference; the default keeps
    the trainable form the file stores."""
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
    rebuilt = (
        f"the model rebuilt as {alloc.model.get('name')!r} with kwargs "
        f"{alloc.model.get('kwargs') or {}}"
    )
    try:
        dense_inv = model_inventory(model, alloc) if deploy else None
        model = skeleton(model, alloc, dense_inv)
    except AutohybridError:
        raise
    except Exception as e:  # noqa: BLE001 - timm's own checks (input size, ...)
        raise CheckpointError(
            f"{path}: {rebuilt} does not run at input {alloc.input_size} "
            f"({type(e).__name__}: {_first_line(e)}); re-export it with this autohybrid, "
            "or pass the model as it was created: load(path, model=...)"
        ) from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{weights} holds NaN or inf values in {len(bad)} tensor(s) (first: {bad[0]}); "
            "the model diverged before it was exported: export it again from a finite model")
    state = _unpack(tensors, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(
            f"{weights} does not fit {rebuilt} ({_first_line(e)}); re-export it with this "
            "autohybrid, or pass the model as it was created: load(path, model=...)"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its allocation: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; re-export the model"
        )
    model.eval()
    if deploy:
        from autohybrid.deploy import deploy as to_forms

        forms = (alloc.meta.get("deploy") or {}).get("forms") or {}
        model = to_forms(model, alloc.layers, forms, dense_inv)
    return model


# ONNX has no sparse matmul: CSR / BSR forms export as their dense equivalents
ONNX_FORMS = {"csr": "dense", "bsr": "dense", "branches-csr": "branches"}


def export_onnx(model: nn.Module, path: str | Path, input_size, batch: int = 1,
                alloc: Allocation | None = None, inv=None) -> Path:
    """Export to ONNX (dynamic batch) atomically. With the model's ``alloc`` and the dense
    model's ``inv``, each compressed layer is exported in its deploy form (recorded at
    export, CSR as its dense equivalent; without one, sparse parts precomputed) rather than
    the scatter it trains with; the file is checked against the PyTorch model with ONNX
    Runtime when installed (``ModelError`` past 1e-4 relative)."""
    model = model.eval()
    if alloc is not None and inv is not None:
        from autohybrid.deploy import deploy

        forms = (alloc.meta.get("deploy") or {}).get("forms") or {}
        model = deploy(copy.deepcopy(model), alloc.layers,
                       {n: ONNX_FORMS.get(f, f) for n, f in forms.items()}, inv)
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
        _check_onnx(model, tmp, input_size)
    return Path(path)


def _check_onnx(model: nn.Module, path, input_size) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        return
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if not err <= 1e-4:
        raise ModelError(f"the ONNX export differs from the PyTorch model by {err:.2e} "
                         "(relative); report this model and allocation")
