"""model -> Inventory: every conv / linear layer with its shape, params and MACs (read-only).

The inventory is the model's description that every later stage works from: cost math takes
``LayerInfo`` records, not modules, and the allocation file is validated against the
inventory's fingerprint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LayerInfo", "Inventory", "inventory", "model_input_size"]

KINDS = ("conv", "pointwise", "depthwise", "grouped", "linear")


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer, described by numbers only.

    For a conv, ``in_hw``/``out_hw`` are the spatial sizes at the model's input size and
    ``positions`` is ``out_h * out_w``. For a linear layer ``positions`` is the number of rows
    it sees per sample (tokens for a ViT, 1 for a classifier).
    """

    name: str
    kind: str
    in_chs: int
    out_chs: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    positions: int = 1
    excluded: bool = False
    supported: bool = True

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if not self.is_conv:
            return (self.out_chs, self.in_chs)
        return (self.out_chs, self.in_chs // self.groups, *self.kernel_size)

    @property
    def weight_numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    @property
    def params(self) -> int:
        return self.weight_numel + (self.out_chs if self.bias else 0)

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates per sample (bias adds are not counted, as torch does)."""
        return self.weight_numel * self.positions

    def structure(self) -> dict:
        """The fields that identify the layer's structure (what the fingerprint hashes)."""
        d = asdict(self)
        for k in ("in_hw", "out_hw", "positions", "excluded"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Inventory(Sequence):
    """The layers of one model at one input size, plus the dense model's totals."""

    layers: tuple[LayerInfo, ...]
    total_params: int
    total_macs: int
    input_size: tuple[int, int, int]
    model_name: str | None = None
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, str):
            return self.by_name[i]
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    @property
    def by_name(self) -> dict[str, LayerInfo]:
        return {layer.name: layer for layer in self.layers}

    @property
    def compressible(self) -> tuple[LayerInfo, ...]:
        return tuple(layer for layer in self.layers if not layer.excluded)

    @property
    def fingerprint(self) -> str:
        """sha256 over the layers' structure: same architecture -> same fingerprint."""
        blob = json.dumps([layer.structure() for layer in self.layers], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def total(self, metric: str) -> int:
        return self.total_params if metric == "params" else self.total_macs

    def table(self, methods=None) -> str:
        """Plain-text table of the layers, for the CLI; ``methods(layer)`` names what applies
        to each (the method registry's ``applicable_methods``)."""
        head = f"{'layer':<40} {'kind':<10} {'weight':<20} {'params':>10} {'MACs':>12}  methods"
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            names = methods(layer) if methods is not None else ()
            methods_col = "(excluded)" if layer.excluded else ", ".join(names)
            shape = "x".join(str(s) for s in layer.weight_shape)
            rows.append(
                f"{layer.name:<40} {layer.kind:<10} {shape:<20} {layer.params:>10,} "
                f"{layer.macs:>12,}  {methods_col}"
            )
        rows.append(
            f"model {self.model_name or '?'} at input {self.input_size}: "
            f"{self.total_params:,} params, {self.total_macs:,} MACs, "
            f"{len(self.compressible)} of {len(self.layers)} layers compressible, "
            f"fingerprint {self.fingerprint}"
        )
        return "\n".join(rows)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _conv_kind(m: nn.Conv2d) -> str:
    if m.groups == 1:
        return "pointwise" if m.kernel_size == (1, 1) else "conv"
    if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
        return "depthwise"
    return "grouped"


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size from timm's pretrained config, else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[return-value]


def default_excludes(model: nn.Module, executed: list[str]) -> list[str]:
    """The stem (first layer run) and the classifier (timm's, else the last layer run)."""
    names = [executed[0]] if executed else []
    get_cls = getattr(model, "get_classifier", None)
    cls = get_cls() if callable(get_cls) else None
    cls_name = next((n for n, m in model.named_modules() if m is cls and n), None)
    names.append(cls_name or (executed[-1] if executed else ""))
    return [n for n in names if n]


@torch.no_grad()
def inventory(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    exclude: Sequence[str] | None = None,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
) -> Inventory:
    """List the conv and linear layers of ``model`` with params and MACs at ``input_size``.

    Args:
        model: any module; timm models give their name and input size themselves.
        input_size: (C, H, W); defaults to timm's ``pretrained_cfg['input_size']``.
        exclude: fnmatch patterns of layer names to leave dense. ``None`` excludes the stem
            (the first layer executed) and the classifier.
        model_name, model_kwargs: identity recorded in allocation files; default to
            ``model.pretrained_cfg['architecture']`` and ``model.autohybrid_kwargs``.
    """
    input_size = tuple(input_size or model_input_size(model))
    seen: dict[str, tuple] = {}
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name:

            def hook(mod, args, out, name=name):
                if name not in seen:
                    order.append(name)
                    seen[name] = (tuple(args[0].shape), tuple(out.shape))

            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    patterns = list(exclude) if exclude is not None else default_excludes(model, order)
    modules = dict(model.named_modules())
    layers = []
    for name in order:
        m = modules[name]
        in_shape, out_shape = seen[name]
        excluded = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if isinstance(m, nn.Linear):
            positions = 1
            for s in in_shape[1:-1]:
                positions *= s
            layers.append(
                LayerInfo(
                    name=name,
                    kind="linear",
                    in_chs=m.in_features,
                    out_chs=m.out_features,
                    bias=m.bias is not None,
                    positions=positions,
                    excluded=excluded,
                    supported=type(m) is nn.Linear,
                )
            )
        else:
            static = isinstance(m.padding, tuple) and m.padding_mode == "zeros"
            layers.append(
                LayerInfo(
                    name=name,
                    kind=_conv_kind(m),
                    in_chs=m.in_channels,
                    out_chs=m.out_channels,
                    kernel_size=_pair(m.kernel_size),
                    stride=_pair(m.stride),
                    padding=_pair(m.padding) if static else (0, 0),
                    dilation=_pair(m.dilation),
                    groups=m.groups,
                    bias=m.bias is not None,
                    in_hw=tuple(in_shape[2:4]),
                    out_hw=tuple(out_shape[2:4]),
                    positions=out_shape[2] * out_shape[3],
                    excluded=excluded,
                    supported=type(m) is nn.Conv2d and static,
                )
            )
    layers = [lay if lay.supported else replace(lay, excluded=True) for lay in layers]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Inventory(
        layers=tuple(layers),
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=counter.get_total_flops() // 2,
        input_size=input_size,  # type: ignore[arg-type]
        model_name=model_name or cfg.get("architecture"),
        num_classes=getattr(model, "num_classes", None),
        model_kwargs=dict(model_kwargs or getattr(model, "autohybrid_kwargs", {}) or {}),
    )
