"""The form a compressed layer runs in when deployed, chosen by measurement.

A compressed layer is trained and stored in one form (a low-rank chain, a sparse branch
scattered into a dense weight at every call, both summed). Deployed, the same numbers can
run in other forms, and which is fastest depends on the layer, the spec and the runtime:

- ``dense``: the whole layer folded into one dense conv / linear weight (a sparse layer, a
  low-rank chain whose chain is slower than the dense layer, an L+S layer whose two branches
  are slower than one);
- ``chain``: a low-rank chain as trained (``built``: any other method's module as built);
- ``branches``: L+S as the chain plus the sparse part as a dense weight, computed once;
- ``csr``: a sparse part as a ``torch.sparse`` CSR matrix times the input (Linear and
  ungrouped 1x1 convs at stride 1, no padding; torch runtime only), alone (``sparse``) or
  beside the chain (``branches-csr``);
- ``bsr``: a ``block-sparse`` layer as a ``torch.sparse`` BSR matrix (blocks of its
  pattern) times the input, on the same layers.

``deploy(model, alloc, forms)`` converts a loaded model in place; the stored file keeps
factors and sparse values, so its size follows the budget and folding happens at load.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from autohybrid.exceptions import ConfigError
from autohybrid.inventory import LayerInfo
from autohybrid.layers import LowRankSparse, _SparseBase
from autohybrid.methods import HYBRID, METHODS
from autohybrid.methods.dense import dense_module
from autohybrid.methods.sparse import parse_block, runs_as_matmul
from autohybrid.spec import LayerSpec

__all__ = ["FORMS", "forms_for", "effective_weight", "deploy_module", "deploy", "CSRLinear",
           "CSRConv1x1", "runs_as_matmul"]

FORMS = ("built", "dense", "chain", "branches", "csr", "branches-csr", "bsr")


def _sparse_tensor(w: torch.Tensor, blocksize: tuple[int, int] | None) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse (CSR|BSR) tensor support is in beta")
        return w.to_sparse_csr() if blocksize is None else w.to_sparse_bsr(blocksize)


def forms_for(layer: LayerInfo, spec: LayerSpec, runtime: str = "torch") -> tuple[str, ...]:
    """The forms ``spec`` can run in on ``runtime`` (the first is the trained form's
    equivalent)."""
    method = METHODS[spec.method]
    kernel = runtime == "torch" and runs_as_matmul(layer)  # a CSR / BSR matmul can run it
    if spec.method == "dense":
        return ("dense",)
    if spec.method == HYBRID:
        return ("branches", "dense", *(("branches-csr",) if kernel else ()))
    if method.lowrank and hasattr(method, "reconstruct"):
        return ("chain", "dense")
    if spec.method == "sparse":
        return ("dense", *(("csr",) if kernel else ()))
    if spec.method == "block-sparse":
        return ("dense", *(("bsr",) if kernel else ()))
    return ("built",)  # a method of its own: run as it builds


def _chain_weights(chain: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for n, p in chain.named_parameters() if not n.endswith("bias")]


def _chain_bias(chain: nn.Module) -> torch.Tensor | None:
    biases = [p.detach() for n, p in chain.named_parameters() if n.endswith("bias")]
    return biases[-1] if biases else None


@torch.no_grad()
def effective_weight(module: nn.Module, layer: LayerInfo, spec: LayerSpec
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense (weight, bias) that ``module`` (built for ``spec``) computes."""
    if spec.method == "dense":
        return module.weight.detach(), (module.bias.detach() if module.bias is not None
                                        else None)
    if isinstance(module, _SparseBase):
        return module.weight().detach(), (module.bias.detach() if module.bias is not None
                                          else None)
    if isinstance(module, LowRankSparse):
        lr = METHODS[spec.factorization]
        low = lr.reconstruct(_chain_weights(module.lowrank), layer)
        sparse_bias = module.sparse.bias
        bias = _chain_bias(module.lowrank)
        if sparse_bias is not None:
            bias = sparse_bias.detach() if bias is None else bias + sparse_bias.detach()
        return (low.reshape(layer.weight_shape) + module.sparse.weight().detach(), bias)
    method = METHODS[spec.method]
    w = method.reconstruct(_chain_weights(module), layer)
    return w.reshape(layer.weight_shape), _chain_bias(module)


class CSRLinear(nn.Module):
    """``x @ W.T + b`` with ``W`` a CSR matrix, or BSR with ``blocksize`` (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 blocksize: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("weight_csr", _sparse_tensor(weight.detach(), blocksize),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        out = (self.weight_csr @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


class CSRConv1x1(nn.Module):
    """A 1x1 conv (stride 1, no padding, one group) as a CSR matrix (BSR with
    ``blocksize``) times the pixels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 blocksize: tuple[int, int] | None = None):
        super().__init__()
        w = weight.detach().reshape(weight.shape[0], weight.shape[1])
        self.register_buffer("weight_csr", _sparse_tensor(w, blocksize), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        cols = x.permute(1, 0, 2, 3).reshape(c, b * h * w)
        out = (self.weight_csr @ cols).reshape(-1, b, h, w).permute(1, 0, 2, 3)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous()


class Branches(nn.Module):
    """L + S deployed: the chain and a precomputed sparse part, summed."""

    def __init__(self, lowrank: nn.Module, sparse: nn.Module):
        super().__init__()
        self.lowrank, self.sparse = lowrank, sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x) + self.sparse(x)


def _dense(layer: LayerInfo, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    m = dense_module(layer, w.to(torch.float32), b)
    if b is None:
        m.bias = None
    return m


def _sparse_form(sparse: _SparseBase, layer: LayerInfo, csr: bool,
                 blocksize: tuple[int, int] | None = None) -> nn.Module:
    w = sparse.weight().detach()
    b = sparse.bias.detach() if sparse.bias is not None else None
    if csr:
        return (CSRLinear if not layer.is_conv else CSRConv1x1)(w, b, blocksize)
    return _dense(layer, w, b)


@torch.no_grad()
def deploy_module(module: nn.Module, layer: LayerInfo, spec: LayerSpec, form: str
                  ) -> nn.Module:
    """``module`` (built for ``spec``) in ``form``; the same outputs up to float rounding."""
    allowed = forms_for(layer, spec)
    if form not in allowed:
        raise ConfigError(f"deploy form {form!r} does not apply to {spec.method} on this "
                          f"{layer.kind} layer; use one of {list(allowed)}")
    if form == "dense":
        return _dense(layer, *effective_weight(module, layer, spec))
    if form in ("chain", "built"):
        return module
    if form in ("branches", "branches-csr"):
        return Branches(module.lowrank,
                        _sparse_form(module.sparse, layer, form == "branches-csr"))
    if form == "csr":
        return _sparse_form(module, layer, True)
    if form == "bsr":
        return _sparse_form(module, layer, True, parse_block(spec.pattern))
    raise ConfigError(f"unknown deploy form {form!r}; use one of {list(FORMS)}")


def deploy(model: nn.Module, layers: Mapping[str, LayerSpec], forms: Mapping[str, str],
           inv) -> nn.Module:
    """Convert ``model``'s compressed layers in place into ``forms`` (layer name -> form);
    a layer without a form keeps its sparse parts precomputed (``dense`` for ``sparse``,
    ``branches`` for L+S: never slower than the trained form, which scatters each call)."""
    by_name = inv.by_name
    for name, spec in layers.items():
        if spec.method == "dense":
            continue
        layer = by_name[name]
        form = forms.get(name) or forms_for(layer, spec)[0]
        old = model.get_submodule(name)
        model.set_submodule(name, deploy_module(old, layer, spec, form))
    return model.eval()
