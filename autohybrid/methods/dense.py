"""``dense``: the layer unchanged. The reference implementation of the method contract."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autohybrid.methods.base import Method, register
from autohybrid.spec import LayerSpec


def dense_module(layer, weight: torch.Tensor | None = None, bias=None) -> nn.Module:
    if layer.is_conv:
        m = nn.Conv2d(
            layer.in_chs,
            layer.out_chs,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias=layer.bias,
        )
    else:
        m = nn.Linear(layer.in_chs, layer.out_chs, bias=layer.bias)
    if weight is not None:
        with torch.no_grad():
            m.weight.copy_(weight)
            if bias is not None:
                m.bias.copy_(bias)
    return m


@register
class Dense(Method):
    name = "dense"
    color = "#7f7f7f"

    def applies_to(self, layer):
        return True

    def spec_at(self, layer, keep, share=0.5, **_):
        return LayerSpec()

    def params(self, layer, spec):
        return layer.params

    def macs(self, layer, spec):
        return layer.macs

    def skeleton(self, layer, spec):
        return dense_module(layer)

    def compress(self, weight, bias, layer, spec, cache=None):
        return dense_module(layer, copy.deepcopy(weight), bias), 0.0
