"""LayerSpec: what to do with one layer. The unit of the allocation file."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerSpec", "FITS"]

FITS = ("weights", "data")


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is compressed.

    Attributes:
        method: a registered method name (``dense``, ``sparse``, ``svd``, ``tucker2``, ``cp``,
            ``tt``, ``lowrank+sparse``).
        factorization: the low-rank method inside ``lowrank+sparse``.
        rank: rank(s) of the low-rank part: ``(r,)`` for svd / cp, ``(r_in, r_out)`` for
            tucker2, the inner TT-ranks for tt.
        sparsity: fraction of the weight's entries that are zero in the sparse part
            (``sparse``), or that the sparse residual leaves out (``lowrank+sparse``).
        pattern: ``unstructured`` or an N:M pattern such as ``2:4``.
        refine: alternating refinements of L and S (``lowrank+sparse`` only).
        fit: ``weights`` (truncate / prune the weight tensor) or ``data`` (fit the layer's
            outputs on calibration data, ``autohybrid.fit``; needs calibration images when the
            allocation is applied, and falls back to ``weights`` without them).
    """

    method: str = "dense"
    factorization: str | None = None
    rank: tuple[int, ...] = field(default_factory=tuple)
    sparsity: float = 0.0
    pattern: str = "unstructured"
    refine: int = 0
    fit: str = "weights"

    def to_dict(self) -> dict:
        d: dict = {"method": self.method}
        if self.factorization:
            d["factorization"] = self.factorization
        if self.rank:
            d["rank"] = list(self.rank)
        if self.sparsity or self.pattern != "unstructured":  # a method with a sparse part
            d["sparsity"] = float(self.sparsity)
            d["pattern"] = self.pattern
        if self.refine:
            d["refine"] = self.refine
        if self.fit != "weights" and self.method != "dense":
            d["fit"] = self.fit
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        known = {"method", "factorization", "rank", "sparsity", "pattern", "refine", "fit"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        rank = d.get("rank", ())
        rank = (rank,) if isinstance(rank, int) else tuple(rank or ())
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in rank):
            raise ValueError(f"rank must be integers, got {d.get('rank')!r}")
        sparsity = d.get("sparsity", 0.0)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number, got {sparsity!r}")
        fit = d.get("fit", "weights")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {list(FITS)}, got {fit!r}")
        return cls(
            method=str(d.get("method", "dense")),
            factorization=d.get("factorization"),
            rank=rank,
            sparsity=float(sparsity),
            pattern=str(d.get("pattern", "unstructured")),
            refine=int(d.get("refine", 0)),
            fit=fit,
        )

