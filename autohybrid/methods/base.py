"""The method contract: does it apply, what does it cost, build the replacement module.

A method is a stateless object registered by name. Cost functions take ``LayerInfo`` and
``LayerSpec`` (numbers), never modules, so they are cheap and exhaustively testable.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from autohybrid.exceptions import MethodError
from autohybrid.fit import FitProblem, refit_left, relative_output_error
from autohybrid.inventory import LayerInfo
from autohybrid.spec import LayerSpec

__all__ = ["Method", "LowRankMethod", "rel_error", "METHODS", "register", "get_method",
           "build", "round_rank", "MAX_SPARSITY"]

MAX_SPARSITY = 0.9999  # the sparsest level a keep fraction maps to (a layer keeps a weight)

METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``; a name taken by
    another class is refused (``unregister`` it first to replace it)."""
    old = METHODS.get(cls.name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise MethodError(f"a method named {cls.name!r} is registered already "
                          f"({type(old).__module__}.{type(old).__qualname__}); pick another name")
    METHODS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method from the registry (tests registering a method of their own)."""
    METHODS.pop(name, None)


def applicable_methods(layer: LayerInfo) -> tuple[str, ...]:
    """Registered methods that apply to ``layer`` (none for excluded / unsupported layers)."""
    if not layer.supported:
        return ()
    return tuple(name for name, m in METHODS.items() if m.applies_to(layer))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None


def rel_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| (0 for an all-zero weight reproduced exactly)."""
    norm = weight.double().norm()
    diff = (weight.double() - approx.double()).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def round_rank(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded to a multiple of ``multiple`` (hardware-friendly), within [1, full]."""
    if multiple <= 1:
        return max(1, min(full, rank))
    return min(full, max(multiple, int(round(rank / multiple)) * multiple))


class Method(ABC):
    """Base class for a per-layer compression method.

    Besides cost and building, a method owns how it is searched: ``spec_at`` turns a keep
    level (fraction of the layer's weight parameters) into its spec, ``grid`` gives the
    candidates a search space's grid holds, ``label`` and ``color`` show a spec in reports.
    Adding a method is one module with a ``@register``-ed subclass."""

    name: ClassVar[str]
    lowrank: ClassVar[bool] = False
    color: ClassVar[str] = "#000000"  # in plots

    @abstractmethod
    def applies_to(self, layer: LayerInfo) -> bool:
        """Whether this method can compress ``layer`` at all."""

    def check(self, layer: LayerInfo, spec: LayerSpec) -> None:
        """Raise ``MethodError`` naming the problem if ``spec`` is invalid for ``layer``."""
        if not self.applies_to(layer):
            raise MethodError(
                f"method {self.name!r} does not apply to {layer.kind} layer; "
                f"applicable: {', '.join(applicable_methods(layer))}"
            )

    @abstractmethod
    def params(self, layer: LayerInfo, spec: LayerSpec) -> int:
        """Parameters stored (bias included; sparse parts by nonzeros)."""

    @abstractmethod
    def macs(self, layer: LayerInfo, spec: LayerSpec) -> int:
        """Multiply-accumulates per sample (sparse parts by nonzeros)."""

    def storage_bytes(self, layer: LayerInfo, spec: LayerSpec) -> int:
        """Bytes on disk in fp32, sparse indices included."""
        return 4 * self.params(layer, spec)

    @abstractmethod
    def skeleton(self, layer: LayerInfo, spec: LayerSpec) -> nn.Module:
        """The replacement module with the right structure and unset values (for loading)."""

    @abstractmethod
    def compress(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: LayerInfo,
        spec: LayerSpec,
        cache: dict | None = None,
    ) -> tuple[nn.Module, float]:
        """Build the replacement module; return it with its relative reconstruction error.

        ``cache`` (one dict per weight) lets a method reuse work across specs of one layer,
        e.g. one SVD for every rank.
        """

    def spec_at(self, layer: LayerInfo, keep: float, share: float = 0.5, *,
                factorization: str | None = None, rank_multiple: int = 1,
                refine: int = 0) -> LayerSpec | None:
        """The spec keeping about ``keep`` (0..1] of the layer's weight parameters, no more
        than rounding to whole counts adds; ``share``: the part of it a second, sparse part
        holds (methods with two parts), ``factorization``: their low-rank part's method,
        ``rank_multiple``: ranks rounded to it, ``refine``: their refinements. None when
        this method cannot express it for this layer. Pure: shapes and numbers only."""
        return None

    def grid(self, layer: LayerInfo, space) -> list[LayerSpec]:
        """The candidates of ``space`` (a ``SearchSpace``: its sparsities, rank ratios, ...)
        for this layer: the rows of the sensitivity table."""
        return []

    def label(self, spec: LayerSpec) -> str:
        """A few words for ``spec`` in tables and plots."""
        return self.name

    def fit(
        self,
        problem: FitProblem,
        bias: torch.Tensor | None,
        layer: LayerInfo,
        spec: LayerSpec,
        cache: dict | None = None,
    ) -> tuple[nn.Module, torch.Tensor]:
        """Build the replacement module fitted to ``problem`` (the layer's outputs on
        calibration data, ``autohybrid.fit``); return it with the dense weight it represents.

        ``cache`` (one dict per problem) holds work shared by specs of the same problem.
        A method without a data fit raises ``NotImplementedError``; ``build`` then falls back
        to ``compress``."""
        raise NotImplementedError


def build(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layer: LayerInfo,
    spec: LayerSpec,
    problem: FitProblem | None = None,
    cache: dict | None = None,
) -> tuple[nn.Module, float]:
    """The replacement module for ``spec`` and its relative error.

    ``spec.fit == "data"`` with a ``problem`` fits the outputs and reports the relative output
    error on the calibration rows; otherwise the weight fit (``compress``) and its relative
    weight error. ``cache`` must belong to this weight (weight fit) or this problem (data fit).
    """
    method = get_method(spec.method)
    if spec.fit == "data" and problem is not None and spec.method != "dense":
        try:
            module, approx = method.fit(problem, bias, layer, spec, cache)
        except NotImplementedError:
            pass
        else:
            return module, relative_output_error(problem, approx)
    return method.compress(weight, bias, layer, spec, cache)


class LowRankMethod(Method):
    """A factorization W ~ f(factors). ``factors`` are the chain's weights, in order."""

    lowrank = True

    def spec_at(self, layer, keep, share=0.5, *, factorization=None, rank_multiple=1,
                refine=0):
        if not self.applies_to(layer):
            return None
        return LayerSpec(self.name, rank=self.rank_for_params(
            layer, keep * layer.weight_numel, rank_multiple))

    def grid(self, layer, space):
        return [LayerSpec(self.name, rank=self.rank_at_ratio(layer, r, space.rank_multiple))
                for r in space.rank_ratios]

    def label(self, spec):
        return f"{self.name} r{'x'.join(map(str, spec.rank))}"

    def rank_at_ratio(self, layer: LayerInfo, ratio: float, multiple: int = 1
                      ) -> tuple[int, ...]:
        """Every rank at ``ratio`` of its full value, rounded to ``multiple``."""
        return tuple(round_rank(round(ratio * m), multiple, m) for m in self.max_rank(layer))

    def rank_for_params(self, layer: LayerInfo, target: float, multiple: int = 1
                        ) -> tuple[int, ...]:
        """The largest rank (every rank at one ratio of its full value) whose factors hold
        at most ``target`` parameters, rounded to ``multiple`` where that does not hold more."""
        from autohybrid.bisect import largest

        ratio = largest(lambda x: self.lowrank_params(layer, self.rank_for_ratio(layer, x))
                        <= target, 0.0, 1.0, steps=20, closed=False)
        rank = self.rank_for_ratio(layer, ratio)
        full = self.max_rank(layer)
        rounded = tuple(round_rank(r, multiple, m) for r, m in zip(rank, full))
        if self.lowrank_params(layer, rounded) > self.lowrank_params(layer, rank):
            return rank  # rounding up would hold more
        return rounded

    @abstractmethod
    def max_rank(self, layer: LayerInfo) -> tuple[int, ...]:
        """The largest meaningful rank(s); ratio 1.0 of every rank."""

    @abstractmethod
    def lowrank_params(self, layer: LayerInfo, rank: tuple[int, ...]) -> int:
        """Parameters of the factors, bias excluded."""

    @abstractmethod
    def lowrank_macs(self, layer: LayerInfo, rank: tuple[int, ...]) -> int:
        """MACs of the chain per sample."""

    @abstractmethod
    def chain(self, layer: LayerInfo, rank: tuple[int, ...], bias: bool) -> nn.Module:
        """The factorized module with unset values."""

    @abstractmethod
    def decompose(
        self,
        weight: torch.Tensor,
        layer: LayerInfo,
        rank: tuple[int, ...],
        cache: dict | None = None,
    ) -> list[torch.Tensor]:
        """Factors of ``weight`` at ``rank``, shaped as the chain's weights. ``cache`` holds
        rank-independent work for this same ``weight``."""

    @abstractmethod
    def reconstruct(self, factors: list[torch.Tensor], layer: LayerInfo) -> torch.Tensor:
        """The dense weight the factors represent."""

    def fit_factors(
        self,
        target: torch.Tensor,
        metric: torch.Tensor,
        layer: LayerInfo,
        rank: tuple[int, ...],
        cache: dict | None = None,
    ) -> list[torch.Tensor]:
        """Factors at ``rank`` fitted to the outputs of weight ``target`` (float64) in the
        damped input moment ``metric`` (G, k, k). The default: decompose the weight, then refit
        the factor next to the output by least squares (``refit_last``)."""
        factors = self.decompose(target, layer, rank)
        return self.refit_last(factors, target, metric, layer)

    def refit_last(
        self, factors: list[torch.Tensor], target: torch.Tensor, metric: torch.Tensor, layer
    ) -> list[torch.Tensor]:
        """``factors`` with the last one refit by least squares for the others fixed, where
        the chain ends in a (out, r) matrix: ``B = T H F^T (F H F^T)^{-1}``, ``F`` the rest of
        the chain as an (r, k) map. Methods whose last factor is not such a matrix override."""
        r = factors[-1].shape[1]
        eye = torch.eye(r, dtype=factors[-1].dtype)
        rest = self.reconstruct([*factors[:-1], eye], layer_with_out(layer, r))
        right = rest.reshape(r, -1)
        last = refit_left(target.reshape(target.shape[0], -1), metric, right)
        return [*factors[:-1], last]

    def fit(self, problem, bias, layer, spec, cache=None):
        factors = balance(self.fit_factors(problem.target, problem.metric, layer, spec.rank,
                                           cache))
        module = self.chain(layer, spec.rank, bias is not None)
        load_factors(module, factors, bias)
        return module, self.reconstruct(factors, layer)

    def rank_for_ratio(self, layer: LayerInfo, ratio: float) -> tuple[int, ...]:
        return tuple(max(1, min(m, round(ratio * m))) for m in self.max_rank(layer))

    def full_rank_for(self, layer: LayerInfo, rank: tuple[int, ...]) -> tuple[int, ...]:
        """The full rank that ``rank`` is compared with (TT: for its number of cores)."""
        return self.max_rank(layer)

    def check(self, layer: LayerInfo, spec: LayerSpec) -> None:
        super().check(layer, spec)
        check_rank(self.name, self.full_rank_for(layer, spec.rank), spec.rank)

    def params(self, layer: LayerInfo, spec: LayerSpec) -> int:
        return self.lowrank_params(layer, spec.rank) + (layer.out_chs if layer.bias else 0)

    def macs(self, layer: LayerInfo, spec: LayerSpec) -> int:
        return self.lowrank_macs(layer, spec.rank)

    def skeleton(self, layer: LayerInfo, spec: LayerSpec) -> nn.Module:
        return self.chain(layer, spec.rank, layer.bias)

    def compress(self, weight, bias, layer, spec, cache=None):
        factors = self.decompose(weight, layer, spec.rank, cache)
        module = self.chain(layer, spec.rank, bias is not None)
        load_factors(module, factors, bias)
        return module, rel_error(weight, self.reconstruct(factors, layer))


def balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``factors`` rescaled to one Frobenius norm (their geometric mean), the product
    unchanged: every factorization here is multilinear in its factors. A least-squares fit
    leaves the scale wherever its algebra puts it (a tucker2 data fit's core can hold norms
    of hundreds against unit-norm bases), and gradient steps on badly scaled factors
    diverge in a fine-tune."""
    norms = [float(f.double().norm()) for f in factors]
    if len(factors) < 2 or min(norms) <= 0.0:
        return factors
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [f * (mean / n) for f, n in zip(factors, norms)]


def layer_with_out(layer: LayerInfo, out_chs: int) -> LayerInfo:
    """``layer`` with another output width (the chain without its last factor)."""
    from dataclasses import replace

    return replace(layer, out_chs=out_chs)


def check_rank(name: str, full: tuple[int, ...], rank: tuple[int, ...]) -> None:
    if len(rank) != len(full):
        raise MethodError(
            f"{name} needs {len(full)} rank value(s) for this layer, got {list(rank)}"
        )
    if any(r < 1 for r in rank):
        raise MethodError(f"{name} rank {list(rank)} must be >= 1")
    if any(r > m for r, m in zip(rank, full)):
        raise MethodError(
            f"{name} rank {list(rank)} exceeds the full rank {list(full)}; "
            "use ranks <= the full rank"
        )


@torch.no_grad()
def load_factors(module: nn.Module, factors: list[torch.Tensor], bias: torch.Tensor | None):
    """Copy ``factors`` into the chain's non-bias parameters in order, ``bias`` into its bias."""
    weights = [p for n, p in module.named_parameters() if not n.endswith("bias")]
    for p, f in zip(weights, factors, strict=True):
        p.copy_(f.reshape(p.shape).to(p.dtype))
    if bias is not None:
        biases = [p for n, p in module.named_parameters() if n.endswith("bias")]
        biases[-1].copy_(bias)
