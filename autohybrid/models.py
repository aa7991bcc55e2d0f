"""Load timm models and checkpoints; the CIFAR ResNets of He et al. (2016) registered with timm.

``create_model`` is the one entry point: a timm name (never downloading weights), optionally a
checkpoint whose stored ``kwargs``, class count and normalisation configure the model.
``load_checkpoint`` only reads tensors (``weights_only=True`` or safetensors) and turns every
way a file can be wrong into a one-line ``CheckpointError``.

The ResNets follow akamaster/pytorch_resnet_cifar10 key for key, so its pretrained checkpoints
load as they are: 3 stages of 16/32/64 channels and "option A" shortcuts (subsample, then
zero-pad the channels; no parameters).
"""

from __future__ import annotations

import difflib
import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .exceptions import CheckpointError, ModelError

__all__ = ["CifarResNet", "check_num_classes", "create_model", "load_checkpoint", "preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where a state dict may sit inside a checkpoint dict, in order of preference.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module")
# Prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- CIFAR ResNets


class ShortcutA(nn.Module):
    """Option-A shortcut: take every other pixel, zero-pad the channels on both sides."""

    def __init__(self, pad_chs: int) -> None:
        super().__init__()
        self.pad_chs = pad_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_chs, self.pad_chs))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or option-A) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ShortcutA(out_chs // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2), timm classifier API."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs: Any
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"CifarResNet got unexpected arguments {sorted(kwargs)}")
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, blocks, stride=2)
        self.linear: nn.Module = nn.Linear(64, num_classes) if num_classes else nn.Identity()
        self.apply(_kaiming_init)

    @staticmethod
    def _make_layer(in_chs: int, out_chs: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_chs, out_chs, stride)]
        layers += [BasicBlock(out_chs, out_chs) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm API)."""
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"CifarResNet only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            _kaiming_init(self.linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: [B, 64, H/4, W/4]."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier unless ``pre_logits``."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights for conv and linear layers, as the original code does."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "origin_url": "https://github.com/akamaster/pytorch_resnet_cifar10",
        "paper_ids": "arXiv:1512.03385",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {f"cifar_resnet{depth}": _cfg() for depth in (20, 32, 44, 56, 110)}
)


def _create_cifar_resnet(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, depth=depth, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR, 0.27M params."""
    return _create_cifar_resnet("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR, 0.46M params."""
    return _create_cifar_resnet("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR, 0.66M params."""
    return _create_cifar_resnet("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR, 0.85M params."""
    return _create_cifar_resnet("cifar_resnet56", 56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR, 1.7M params."""
    return _create_cifar_resnet("cifar_resnet110", 110, pretrained, **kwargs)


# --------------------------------------------------------------------------- create / load


def create_model(
    name: str,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model (never downloading weights), optionally loading a checkpoint.

    Args:
        name: a timm model name, e.g. ``cifar_resnet20`` or ``mobilenetv3_small_100``.
        num_classes: classifier size; ``None`` takes it from the checkpoint, else timm's default.
        checkpoint: weights to load (see ``load_checkpoint``). A checkpoint dict that records
            ``kwargs`` and ``normalize`` (mean/std) also supplies the creation kwargs (when none
            are given here) and the model's preprocessing.
        **kwargs: passed to ``timm.create_model``; kept as ``model.autohybrid_kwargs``.

    Raises:
        ModelError: unknown name or kwargs the model does not accept.
        CheckpointError: unreadable checkpoint, or one that does not fit the model.
    """
    name = str(name)
    if not timm.is_model(name):
        raise ModelError(_unknown_model_message(name))
    state_dict: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        state_dict, meta = _read_checkpoint(checkpoint)
        _check_checkpoint_model(name, meta, checkpoint)
        if not kwargs and isinstance(meta.get("kwargs"), Mapping):
            kwargs = dict(meta["kwargs"])
        if num_classes is None:
            num_classes = _checkpoint_num_classes(name, state_dict, meta)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelError(f"cannot build {name!r} with kwargs {kwargs}: {_first_line(e)}") from e
    model.autohybrid_kwargs = dict(kwargs)
    _update_pretrained_cfg(model, kwargs, meta)
    if state_dict is not None:
        _load_state_dict(model, state_dict, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights into ``model`` (strictly) and return the metadata stored beside them.

    Accepts a plain state dict, a dict holding one under ``state_dict`` / ``model`` /
    ``model_state`` (with or without a ``module.`` prefix), or a ``.safetensors`` file. Pickles
    are read with ``weights_only=True``: a file that would run code is refused.
    """
    state_dict, meta = _read_checkpoint(path)
    _load_state_dict(model, state_dict, path)
    return meta


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """The input pipeline the model expects: mean, std, input_size, interpolation, crop_pct."""
    cfg = resolve_data_config({}, model=model)
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct")
    return {k: cfg[k] for k in keys}


def _unknown_model_message(name: str) -> str:
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{name}*") if n not in close]
    hint = f"did you mean {', '.join(close[:5])}? " if close else ""
    return f"unknown model {name!r}; {hint}see `timm.list_models()` for all names"


def _check_checkpoint_model(name: str, meta: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that records another architecture than ``name``."""
    saved = meta.get("model")
    if isinstance(saved, str) and saved.split(".")[0] != name.split(".")[0]:
        raise CheckpointError(
            f"checkpoint {path} was saved from model {saved!r}, not {name!r}; "
            f"use the model name {saved!r}"
        )


def _checkpoint_num_classes(
    name: str, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> int | None:
    """The class count shown by the checkpoint's classifier weight, else its ``num_classes``."""
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0] if classifier else None
    weight = state_dict.get(f"{classifier}.weight") if classifier else None
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
        return int(weight.shape[0])
    saved = meta.get("num_classes")
    return saved if isinstance(saved, int) else None


def _update_pretrained_cfg(model: nn.Module, kwargs: Mapping[str, Any], meta: Mapping) -> None:
    """Make ``model.pretrained_cfg`` describe this model, not timm's ImageNet weights."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if isinstance(getattr(model, "num_classes", None), int):
        cfg["num_classes"] = model.num_classes
    img_size = meta.get("input_size") or kwargs.get("img_size")
    if img_size is not None:
        cfg["input_size"] = _input_size(img_size, kwargs.get("in_chans", 3))
    normalize = meta.get("normalize")
    if isinstance(normalize, Mapping) and "mean" in normalize and "std" in normalize:
        cfg["mean"] = tuple(float(v) for v in normalize["mean"])
        cfg["std"] = tuple(float(v) for v in normalize["std"])
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def _input_size(size: int | tuple[int, ...] | list[int], in_chans: int) -> tuple[int, int, int]:
    """(C, H, W) from an ``img_size`` int, (H, W) or (C, H, W)."""
    if isinstance(size, int):
        return (in_chans, size, size)
    size = tuple(int(s) for s in size)
    return size if len(size) == 3 else (in_chans, *size)  # type: ignore[return-value]


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file into (state dict, metadata), only ever loading tensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; pass a .pth/.pt/.safetensors")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes); the save or download was interrupted, "
            "save or download it again"
        )
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(path)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save file nor safetensors); "
            "pass a file written by torch.save or safetensors"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        if found or why:
            what = found.group(1) if found else why.group(1).strip()
            raise CheckpointError(
                f"checkpoint {path} refused: it is not a plain tensor checkpoint and loading it "
                f"fully could execute code ({what}); re-save it with "
                "torch.save(model.state_dict(), path) or as safetensors"
            ) from None
        raise _corrupt(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _corrupt(path, e) from None
    return _split_checkpoint(obj, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None
    if not state_dict:
        raise CheckpointError(f"checkpoint {path} holds no tensors; save the model's weights")
    return _strip_prefixes(state_dict), {k: _json_or_str(v) for k, v in raw_meta.items()}


def _json_or_str(value: str) -> Any:
    """Safetensors metadata values are strings; structured ones are stored as JSON."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a checkpoint ({_first_line(error)}); "
        "download or save it again"
    )


def _first_line(error: BaseException, limit: int = 120) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside a loaded checkpoint; everything beside it is metadata."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; "
            "re-save it with torch.save(model.state_dict(), path)"
        )
    for key in _STATE_DICT_KEYS:
        value = obj.get(key)
        if _is_state_dict(value):
            meta = {k: v for k, v in obj.items() if k != key}
            return _strip_prefixes(value), meta
    if _is_state_dict(obj):
        return _strip_prefixes(obj), {}
    keys = ", ".join(map(str, list(obj)[:8]))
    raise CheckpointError(
        f"checkpoint {path} holds no weights (keys: {keys}); expected a state dict or a dict "
        "with 'state_dict'; re-save it with torch.save(model.state_dict(), path)"
    )


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` when every key carries it."""
    state_dict = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _load_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path
) -> None:
    """Strict load that reports missing, unexpected and mis-shaped keys in one line."""
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 have no BatchNorm num_batches_tracked; torch fills it.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    if shapes:
        problems.append(_some(shapes))
    if problems:
        hint = (
            "is it for another architecture or other model kwargs?"
            if missing or unexpected
            else "wrong --num-classes or architecture?"
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {'; '.join(problems)} — {hint}"
        )
    _check_finite(state_dict, path)
    model.load_state_dict(state_dict, strict=True)


def _check_finite(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse NaN / inf weights, naming the first tensor that holds them."""
    bad = [
        (k, v) for k, v in state_dict.items()
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    ]
    if not bad:
        return
    name, v = bad[0]
    nan = int(torch.isnan(v).sum())
    inf = v.numel() - nan - int(torch.isfinite(v).sum())
    what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if s)
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    raise CheckpointError(
        f"checkpoint {path} holds non-finite weights: {name} has {what} of {v.numel()} "
        f"values{more}; the training diverged or the file is damaged, use another checkpoint"
    )


def check_num_classes(model: nn.Module, num_classes: int, data: str) -> None:
    """Refuse a classifier whose output count is not the data's class count.

    The model's count is its ``num_classes`` (timm's attribute; models without one are not
    checked). Raises ``ModelError`` naming both counts.
    """
    own = getattr(model, "num_classes", None)
    if isinstance(own, bool) or not isinstance(own, int) or own == num_classes:
        return
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(
        model
    ).__name__
    raise ModelError(
        f"model {name!r} has {own} outputs but {data} has {num_classes} classes; use a "
        f"checkpoint trained on these {num_classes} classes, or --num-classes {num_classes} "
        "for a new head"
    )


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... {len(items) - limit} more"
