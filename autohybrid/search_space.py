"""Search spaces: which layers are compressible and which candidates each layer may take.

Declared per model family in ``search_spaces/*.yaml`` (at the repository root, installed as
the data package ``autohybrid.search_spaces``), picked from the model name, or given with
``--search-space FILE``. A dataclass that round-trips to YAML and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autohybrid.config import check_keys
from autohybrid.exceptions import AutohybridError, ConfigError, MethodError
from autohybrid.inventory import KINDS, Inventory, LayerInfo
from autohybrid.methods import HYBRID, METHODS, LowRankMethod, round_rank
from autohybrid.spec import LayerSpec

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

__all__ = [
    "SearchSpace",
    "load_search_space",
    "builtin_spaces",
    "SEARCH_SPACE_DIR",
    "SearchSpaceMissingError",
    "round_rank",
]

SEARCH_SPACE_PACKAGE = "autohybrid.search_spaces"


class SearchSpaceMissingError(AutohybridError):
    """No built-in search space was installed (a broken installation)."""


def _search_space_dir() -> Traversable:
    """Where the built-in spaces are: the installed data package ``autohybrid.search_spaces``
    (a wheel, or an editable install made with this pyproject), else the source tree's
    ``search_spaces/`` (an editable install made before that package existed)."""
    try:
        root = importlib.resources.files(SEARCH_SPACE_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "search_spaces"
    if not isinstance(root, Path):  # a namespace package (no __init__.py): its folder
        files = [Path(str(e)) for e in root.iterdir() if e.name.endswith(".yaml")]
        return files[0].parent if files else root
    return root


SEARCH_SPACE_DIR = _search_space_dir()


@dataclass
class SearchSpace:
    """Candidates per layer kind, grids of rank ratios and sparsities.

    ``methods`` maps a layer kind (conv, pointwise, depthwise, grouped, linear) to the
    candidate methods; a low-rank method's rank grid is ``rank_ratios``; ``sparse`` uses
    ``sparsities``; ``lowrank+sparse`` uses every pair of ``hybrid_rank_ratios`` x
    ``hybrid_sparsities`` with the kind's factorization from ``factorizations``.
    """

    name: str = "default"
    match: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    exclude_stem_and_head: bool = True
    methods: dict[str, list[str]] = field(
        default_factory=lambda: {
            "conv": ["sparse", "tucker2", HYBRID],
            "pointwise": ["sparse", "svd", HYBRID],
            "depthwise": ["sparse"],
            "grouped": ["sparse"],
            "linear": ["sparse", "svd", HYBRID],
        }
    )
    factorizations: dict[str, str] = field(
        default_factory=lambda: {"conv": "tucker2", "pointwise": "svd", "linear": "svd"}
    )
    rank_ratios: list[float] = field(default_factory=lambda: [0.5, 0.35, 0.25, 0.15])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 0.95])
    hybrid_rank_ratios: list[float] = field(default_factory=lambda: [0.25, 0.1])
    hybrid_sparsities: list[float] = field(default_factory=lambda: [0.9, 0.97])
    nm_patterns: list[str] = field(default_factory=list)
    rank_multiple: int = 1
    refine: int = 1

    # -- YAML -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "search space") -> SearchSpace:
        check_keys(cls, d, source)
        space = cls(**d)
        space.validate(source)
        return space

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from autohybrid.io import atomic_write_text

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def validate(self, source: str = "search space") -> None:
        for kind, methods in self.methods.items():
            if kind not in KINDS:
                raise ConfigError(f"{source}: unknown layer kind {kind!r}; use {list(KINDS)}")
            for m in methods:
                if m not in METHODS:
                    raise ConfigError(
                        f"{source}: unknown method {m!r} for {kind}; valid: {sorted(METHODS)}"
                    )
        for kind, f in self.factorizations.items():
            if not isinstance(METHODS.get(f), LowRankMethod):
                raise ConfigError(f"{source}: factorization {f!r} for {kind} is not low-rank")
        for key in ("rank_ratios", "hybrid_rank_ratios"):
            for r in getattr(self, key):
                if not isinstance(r, (int, float)) or not 0 < r <= 1:
                    raise ConfigError(f"{source}: {key} value {r!r} must be in (0, 1]")
        for key in ("sparsities", "hybrid_sparsities"):
            for s in getattr(self, key):
                if not isinstance(s, (int, float)) or not 0 <= s < 1:
                    raise ConfigError(f"{source}: {key} value {s!r} must be in [0, 1)")
        if not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ConfigError(f"{source}: rank_multiple must be an integer >= 1")

    def for_latency(self) -> SearchSpace:
        """This space with ``block-sparse`` added to the pointwise and linear layers: under
        the latency metric a BSR kernel can make a sparse layer faster than the dense one
        (unstructured sparsity only at very high levels), and the latency table measures
        where. Under params / MACs block-sparse is dominated by ``sparse`` (the same count,
        a coarser mask), so the other metrics leave it out."""
        methods = {k: list(v) for k, v in self.methods.items()}
        for kind in ("pointwise", "linear"):
            if kind in methods and "block-sparse" not in methods[kind]:
                methods[kind].append("block-sparse")
        return dataclasses.replace(self, methods=methods)

    # -- layers and candidates --------------------------------------------------------------
    def compressible(self, inv: Inventory) -> list[LayerInfo]:
        """The layers this space searches over, in model order."""
        out = []
        for layer in inv:
            if not layer.supported or (self.exclude_stem_and_head and layer.excluded):
                continue
            if not any(fnmatch.fnmatchcase(layer.name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(layer.name, p) for p in self.exclude):
                continue
            if self.candidates(layer):
                out.append(layer)
        return out

    def candidates(self, layer: LayerInfo) -> list[LayerSpec]:
        """Every candidate spec for ``layer`` (dense excluded), duplicates removed: each
        method's ``grid`` of this space."""
        out: list[LayerSpec] = []
        for name in self.methods.get(layer.kind, []):
            if METHODS[name].applies_to(layer):
                out += METHODS[name].grid(layer, self)
        valid, seen = [], set()
        for spec in out:
            if spec in seen:
                continue
            seen.add(spec)
            try:
                METHODS[spec.method].check(layer, spec)
            except MethodError:
                continue
            valid.append(spec)
        return valid


def builtin_spaces() -> dict[str, Traversable]:
    """The built-in space files by name; ``SearchSpaceMissingError`` if none is installed."""
    try:
        entries = list(SEARCH_SPACE_DIR.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    found = {
        e.name[: -len(".yaml")]: e
        for e in sorted(entries, key=lambda e: e.name)
        if e.name.endswith(".yaml") and e.is_file()
    }
    if not found:
        raise SearchSpaceMissingError(
            f"no built-in search space found in {SEARCH_SPACE_DIR} (package "
            f"{SEARCH_SPACE_PACKAGE}); the installation is incomplete: reinstall autohybrid, "
            "or pass a search space file with --search-space FILE"
        )
    return found


def read_search_space(path: str | Path | Traversable) -> SearchSpace:
    if isinstance(path, str):
        path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path}: malformed YAML; fix the file") from None
    return SearchSpace.from_dict(data, source=str(path))


def load_search_space(
    model_name: str | None = None, path: str | Path | None = None
) -> SearchSpace:
    """The space in ``path``, else the built-in one whose ``match`` fits ``model_name``,
    else ``default``."""
    if path is not None:
        return read_search_space(path)
    spaces = {name: read_search_space(p) for name, p in builtin_spaces().items()}
    for name, space in spaces.items():
        matches = any(fnmatch.fnmatchcase(model_name or "", m) for m in space.match)
        if name != "default" and matches:
            return space
    return spaces.get("default", SearchSpace())
