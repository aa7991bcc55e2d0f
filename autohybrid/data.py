"""Datasets behind one spec string, preprocessed the way the model expects.

Every subcommand takes the same ``--data`` spec, parsed once here by ``load_data``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download), a fixed stratified
  80/20 split. Small enough for tests and smoke runs.
- ``cifar10:DIR``: CIFAR-10 as ``train_x.npy``/``train_y.npy``/``test_x.npy``/``test_y.npy``
  (uint8 [N, 32, 32, 3]) or as the official python batches (``data_batch_1..5``,
  ``test_batch``), which are read with an unpickler that only builds dicts, lists, bytes and
  numpy arrays.
- ``imagefolder:DIR``: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/...`` with timm's eval
  transform (resize, centre crop) from the model's data config.

Mean, std and input size come from the model's data config (``model.pretrained_cfg``); the
normalisation happens in one place, ``Preprocess``. In-memory datasets preprocess whole batches
at once (``__getitems__``), so a DataLoader over CIFAR never touches PIL.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .exceptions import DataError

__all__ = [
    "ArrayDataset", "DataBundle", "Preprocess", "calibration_subset", "data_config",
    "load_data", "loader", "Splits", "train_splits",
]

SPEC_FORMS = (
    "'digits', 'cifar10:DIR' (train_x.npy/train_y.npy/test_x.npy/test_y.npy or the python "
    "batches data_batch_1..5 + test_batch) or 'imagefolder:DIR' (DIR/train/<class>/, "
    "DIR/val/<class>/)"
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_NPY_FILES = ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy")
_BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


# --------------------------------------------------------------------------- preprocessing


def data_config(model: nn.Module, input_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """The model's input pipeline (timm's resolved data config), ``input_size`` overriding.

    Args:
        model: a timm model; ``model.pretrained_cfg`` supplies mean, std, input size,
            interpolation and crop_pct.
        input_size: ``S``, ``(H, W)`` or ``(C, H, W)`` to use instead of the model's size.
    """
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if input_size is not None:
        size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
        if len(size) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in size):
            raise DataError(
                f"input size {input_size!r} is not S, (H, W) or (C, H, W) of positive ints; "
                "pass e.g. 32 or (3, 224, 224)"
            )
        args["input_size"] = size if len(size) == 3 else (3, *size)
    return resolve_data_config(args, model=model)


class Preprocess:
    """Images in [0, 255] (uint8) or [0, 1] (float) -> normalised float at the input size.

    The single place where the model's mean/std are applied. Accepts one image [C, H, W] or a
    batch [N, C, H, W]; grey images are replicated to the model's channel count and images of
    another size are resized (bilinear) when ``size`` is set.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], size: Sequence[int] | None = None
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.size = tuple(int(s) for s in size) if size is not None else None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], resize: bool = True) -> Preprocess:
        """Build from a ``data_config`` dict; ``resize=False`` when a transform already did."""
        return cls(cfg["mean"], cfg["std"], tuple(cfg["input_size"][-2:]) if resize else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        chans = self.mean.shape[0]
        if x.shape[1] == 1 and chans != 1:
            x = x.expand(-1, chans, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            down = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, self.size, mode="bilinear", align_corners=False, antialias=down)
        x = (x - self.mean).div_(self.std)
        return x[0] if single else x

    def __repr__(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"Preprocess(mean={mean}, std={std}, size={self.size})"


class ArrayDataset(Dataset):
    """Images held as one tensor [N, C, H, W]; ``Preprocess`` runs per batch when loading.

    ``images`` are uint8 (0..255) or float (0..1), possibly a channels-last view of [N, H, W, C]
    arrays; items are (normalised float [C, H, W], int).
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, preprocess: Preprocess
    ) -> None:
        if len(images) != len(targets):
            raise DataError(
                f"{len(images)} images but {len(targets)} labels; every image needs one label"
            )
        self.images = images
        self.targets = targets.long()
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.images[index]), int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch preprocessed at once (DataLoader calls this when it exists)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self.preprocess(self.images[index])
        return list(zip(batch.unbind(0), self.targets[index].tolist()))


@dataclass(frozen=True)
class DataBundle:
    """Train and test splits of one dataset, preprocessed for one model."""

    spec: str
    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    preprocess: Preprocess
    mirror_invariant: bool = True  # a horizontally flipped image keeps its label (augmentation)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def calibration(self, n: int, seed: int = 0) -> Subset:
        """``n`` training samples for calibration (see ``calibration_subset``)."""
        return calibration_subset(self.train, n, seed)

    def splits(self, calib: int, val: int, seed: int = 0) -> Splits:
        """The training split cut three ways, disjoint: ``calib`` calibration images (the
        same as ``calibration(calib, seed)``), ``val`` validation images (every choice is
        made on them) and the rest for fine-tuning. The test split is only reported."""
        return train_splits(self.train, calib, val, seed)


@dataclass(frozen=True)
class Splits:
    """Disjoint subsets of one training split (``DataBundle.splits``)."""

    calibration: Subset
    validation: Subset
    finetune: Subset


# --------------------------------------------------------------------------- entry points


def load_data(
    spec: str,
    model: nn.Module,
    input_size: int | Sequence[int] | None = None,
    check_classes: bool = True,
) -> DataBundle:
    """Parse a data spec and load both splits, preprocessed as ``model`` expects.

    Args:
        spec: ``digits``, ``cifar10:DIR`` or ``imagefolder:DIR``.
        model: the network the data is for; its data config gives mean, std and input size.
        input_size: overrides the model's input size (``S``, ``(H, W)`` or ``(C, H, W)``).
        check_classes: refuse a model whose ``num_classes`` is not the data's class count
            (False: the model only supplies the preprocessing).

    Raises:
        DataError: unknown spec, missing or empty directory, unrecognised files, bad labels.
        ModelError: with ``check_classes``, a classifier head of another class count.
    """
    bundle = _load_bundle(spec, model, input_size)
    if check_classes:
        from .models import check_num_classes

        check_num_classes(model, bundle.num_classes, bundle.spec)
    return bundle


def _load_bundle(
    spec: str, model: nn.Module, input_size: int | Sequence[int] | None
) -> DataBundle:
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    cfg = data_config(model, input_size)
    if kind == "digits":
        if arg:
            raise DataError(f"data spec {spec!r}: 'digits' takes no directory; pass 'digits'")
        return _load_digits(spec, Preprocess.from_config(cfg))
    if kind in ("cifar10", "imagefolder"):
        if not arg.strip():
            raise DataError(
                f"data spec {spec!r} names no directory; pass '{kind}:DIR', e.g. '{kind}:data/'"
            )
        root = _existing_dir(Path(arg.strip()).expanduser(), spec)
        if kind == "cifar10":
            return _load_cifar10(spec, root, Preprocess.from_config(cfg))
        return _load_imagefolder(spec, root, cfg)
    raise DataError(f"unknown data spec {spec!r}; use one of {SPEC_FORMS}")


def as_tensors(dataset: Dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (preprocessed) dataset as one image tensor and one label tensor."""
    xs, ys = [], []
    for x, y in loader(dataset, batch_size):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("no samples to stack; the dataset is empty")
    return torch.cat(xs), torch.cat(ys).long()


def calibration_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A reproducible sample of ``n`` items of ``dataset`` (pass the TRAIN split).

    Stratified by class when the dataset exposes ``targets`` (ArrayDataset, ImageFolder, or a
    Subset of one) and every class can be represented; uniform otherwise. Indices are sorted.
    """
    if n < 1:
        raise DataError(f"calibration subset size must be >= 1, got {n}")
    total = len(dataset)
    if n >= total:
        return Subset(dataset, list(range(total)))
    targets = _targets(dataset)
    index: np.ndarray | None = None
    if targets is not None:
        from sklearn.model_selection import train_test_split

        try:
            index, _ = train_test_split(
                np.arange(total), train_size=n, stratify=targets, random_state=seed
            )
        except ValueError:  # a class too small, or n below the class count
            index = None
    if index is None:
        index = np.random.default_rng(seed).choice(total, size=n, replace=False)
    return Subset(dataset, sorted(int(i) for i in index))


def train_splits(dataset: Dataset, calib: int, val: int, seed: int = 0) -> Splits:
    """Calibration, validation and fine-tune subsets of ``dataset``, pairwise disjoint.
    Calibration is ``calibration_subset(dataset, calib, seed)``; validation a sample of the
    rest stratified by class like it (``seed + 1``); fine-tune everything left."""
    total = len(dataset)
    if val < 1:
        raise DataError(f"validation size must be >= 1, got {val}")
    if calib + val >= total:
        raise DataError(
            f"the training split has {total} images: too few for {calib} calibration + {val} "
            "validation images and a fine-tune set; lower --calib or --val"
        )
    cal = calibration_subset(dataset, calib, seed)
    rest = np.setdiff1d(np.arange(total), np.asarray(cal.indices, dtype=np.int64))
    pick = calibration_subset(Subset(dataset, rest.tolist()), val, seed + 1).indices
    val_index = rest[np.asarray(pick, dtype=np.int64)]
    tune = np.setdiff1d(rest, val_index)
    return Splits(cal, Subset(dataset, sorted(int(i) for i in val_index)),
                  Subset(dataset, [int(i) for i in tune]))


def loader(
    dataset: Dataset,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader; in-memory datasets load in the main process, image folders in workers."""
    if num_workers is None:
        in_memory = isinstance(_base(dataset), ArrayDataset)
        num_workers = 0 if in_memory else min(4, os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _targets(dataset: Dataset) -> np.ndarray | None:
    if isinstance(dataset, Subset):
        parent = _targets(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets.numpy()
    return np.asarray(targets)


def _existing_dir(root: Path, spec: str) -> Path:
    if not root.exists():
        raise DataError(f"data directory not found: {root} (from {spec!r}); check the path")
    if not root.is_dir():
        raise DataError(f"{root} (from {spec!r}) is not a directory; pass the dataset's folder")
    return root


def _first_line(error: BaseException, limit: int = 120) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_labels(y: np.ndarray, num_classes: int, where: Path) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataError(
            f"labels in {where} are {y.dtype} {list(y.shape)}, expected integers [N]; "
            "save the class indices"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"labels in {where} range over {int(y.min())}..{int(y.max())}, outside "
            f"0..{num_classes - 1}; fix the labels (class indices 0..{num_classes - 1})"
        )
    return y.astype(np.int64)


# --------------------------------------------------------------------------- digits


def _load_digits(spec: str, preprocess: Preprocess) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    targets = torch.from_numpy(digits.target.astype(np.int64))
    train, test = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return DataBundle(
        spec=spec,
        train=ArrayDataset(images[train], targets[train], preprocess),
        test=ArrayDataset(images[test], targets[test], preprocess),
        classes=tuple(str(i) for i in range(10)),
        preprocess=preprocess,
        mirror_invariant=False,  # a mirrored digit is another glyph (or none)
    )


# --------------------------------------------------------------------------- CIFAR-10


def _load_cifar10(spec: str, root: Path, preprocess: Preprocess) -> DataBundle:
    if not any((root / f).exists() for f in _NPY_FILES + _BATCH_FILES):
        nested = root / "cifar-10-batches-py"
        if nested.is_dir():
            root = nested
    have_npy = [f for f in _NPY_FILES if (root / f).exists()]
    have_batches = [f for f in _BATCH_FILES if (root / f).exists()]
    classes = _cifar_classes(root)
    n = len(classes)
    if have_npy:
        _require(root, _NPY_FILES, "the numpy arrays")
        train = _read_npy_pair(root, "train", n)
        test = _read_npy_pair(root, "test", n)
    elif have_batches:
        _require(root, _BATCH_FILES, "the python batches")
        parts = [_read_batch(root / f, n) for f in _BATCH_FILES[:5]]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _read_batch(root / "test_batch", n)
    else:
        raise DataError(
            f"no CIFAR-10 files in {root}; expected {', '.join(_NPY_FILES)} (uint8 "
            f"[N, 32, 32, 3]) or the python batches {', '.join(_BATCH_FILES)}"
        )
    splits = []
    for x, y in (train, test):
        images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # a view: no copy
        splits.append(ArrayDataset(images, torch.from_numpy(y), preprocess))
    return DataBundle(spec, splits[0], splits[1], classes, preprocess)


def _require(root: Path, files: Sequence[str], what: str) -> None:
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise DataError(
            f"incomplete CIFAR-10 in {root}: {what} lack {', '.join(missing)}; "
            f"expected all of {', '.join(files)}"
        )


def _read_npy_pair(root: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _read_npy(root / f"{split}_x.npy"), _read_npy(root / f"{split}_y.npy")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{root / f'{split}_x.npy'} holds {x.dtype} {list(x.shape)}; expected uint8 "
            "[N, 32, 32, 3] (HWC, RGB)"
        )
    if len(x) != len(y):
        raise DataError(
            f"{split}_x.npy has {len(x)} images but {split}_y.npy {len(y)} labels in {root}; "
            "they must match one to one"
        )
    return x, _check_labels(y, num_classes, root / f"{split}_y.npy")


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = _first_line(e)
        raise DataError(f"cannot read {path} ({reason}); save it with numpy.save") from None


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever numpy keeps it
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x


class _BatchUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings, bytes and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in _NUMPY_MULTIARRAY:
            return _RECONSTRUCT
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _frombuffer
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """numpy's pickle-protocol-5 array constructor, minus object arrays."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """How protocol-2 pickles spell ``bytes``; no other codec is allowed."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin1")


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise DataError(
                f"refused to load {path}: unpickling it would call {e} (possibly malicious, "
                "not a CIFAR-10 batch); use the official cifar-10-python files or .npy arrays"
            ) from None
        raise DataError(f"{path} is corrupt ({_first_line(e)}); download CIFAR-10 again") from None
    except (EOFError, ValueError, TypeError, OSError, AttributeError, IndexError) as e:
        raise DataError(
            f"{path} is corrupt or not a CIFAR-10 batch ({_first_line(e)}); "
            "download CIFAR-10 again"
        ) from None


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = _get(batch, "data") if isinstance(batch, dict) else None
    labels = _get(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(
            f"{path} is not a CIFAR-10 batch (expected a dict with 'data' and 'labels'); "
            "download CIFAR-10 again"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path} holds data {data.dtype} {list(data.shape)}; expected uint8 [N, 3072]"
        )
    labels = np.asarray(labels)
    if len(labels) != len(data):
        raise DataError(
            f"{path} has {len(data)} images but {len(labels)} labels; download CIFAR-10 again"
        )
    labels = _check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_classes(root: Path) -> tuple[str, ...]:
    """Class names from classes.txt or batches.meta, else the standard CIFAR-10 order."""
    txt, meta = root / "classes.txt", root / "batches.meta"
    names: list[str] = []
    if txt.is_file():
        names = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    elif meta.is_file():
        loaded = _unpickle(meta)
        raw = _get(loaded, "label_names") if isinstance(loaded, dict) else None
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw or []]
    if names and len(names) != len(CIFAR10_CLASSES):
        raise DataError(
            f"{txt if txt.is_file() else meta} lists {len(names)} classes; CIFAR-10 has 10, "
            "one name a line"
        )
    return tuple(names) or CIFAR10_CLASSES


# --------------------------------------------------------------------------- image folders


def _load_imagefolder(spec: str, root: Path, cfg: dict[str, Any]) -> DataBundle:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose

    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise DataError(
            f"imagefolder:{root} needs DIR/train/<class>/ and DIR/val/<class>/; "
            f"{' and '.join(str(root / d) for d in missing)} not found"
        )
    preprocess = Preprocess.from_config(cfg, resize=False)
    resize_crop = create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode"),
        mean=cfg["mean"],
        std=cfg["std"],
        normalize=False,  # uint8 tensor out; Preprocess normalises
    )
    transform = Compose([resize_crop, preprocess])
    splits = []
    for split in ("train", "val"):
        _check_class_folders(root / split)
        splits.append(ImageFolder(str(root / split), transform=transform))
    train, val = splits
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"class folders differ between {root}/train and {root}/val (only in train: "
            f"{only_train}, only in val: {only_val}); use the same class folders in both"
        )
    return DataBundle(spec, train, val, tuple(train.classes), preprocess)


def _check_class_folders(folder: Path) -> None:
    """Refuse a split without class folders, or with a class folder holding no images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    expected = f"expected {folder}/<class>/*.png|jpg (one sub-folder per class)"
    if not classes:
        raise DataError(f"no class folders in {folder}; {expected}")
    empty = [
        d.name
        for d in classes
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob("*") if f.is_file())
    ]
    if empty:
        raise DataError(f"no images in {folder} for class(es) {', '.join(empty)}; {expected}")
