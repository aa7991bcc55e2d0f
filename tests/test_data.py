"""Contracts of autohybrid.data: the three data specs, one normalisation, and their errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from autohybrid.data import (
    CIFAR10_CLASSES,
    ArrayDataset,
    calibration_subset,
    data_config,
    load_data,
    loader,
)
from autohybrid.exceptions import DataError
from autohybrid.models import create_model
from tests.conftest import shared_path

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)  # cifar_resnet20's data config
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


@pytest.fixture(scope="module")
def model():
    return create_model("cifar_resnet20")  # input 32x32, ImageNet mean/std


@pytest.fixture(scope="module")
def digits(model):
    return load_data("digits", model)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def data_error(match: str) -> pytest.RaisesContext:
    return pytest.raises(DataError, match=match)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_split(digits) -> None:
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.num_classes == 10 and digits.classes == tuple("0123456789")
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    # stratified: 36 test images of every class (+-1)
    counts = np.bincount(digits.test.targets.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_normalisation_grey_to_rgb(digits) -> None:
    xb, yb = next(iter(loader(digits.test, 64)))
    assert xb.shape == (64, 3, 32, 32) and yb.dtype == torch.int64
    raw = unnormalise(xb)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.max() > 0.99  # ink at full intensity
    torch.testing.assert_close(raw[:, 0], raw[:, 1])  # grey replicated to 3 channels
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    corner = xb[:, :, 0, 0]  # digits have blank borders: 0 -> -mean/std
    torch.testing.assert_close(corner, (-MEAN / STD).view(1, 3).expand_as(corner))


def test_batch_and_item_paths_agree(digits) -> None:
    xb, yb = next(iter(loader(digits.train, 16)))
    items = [digits.train[i] for i in range(16)]
    torch.testing.assert_close(xb, torch.stack([x for x, _ in items]))
    assert yb.tolist() == [y for _, y in items]


def test_digits_reproducible_and_input_size_override(model, digits) -> None:
    again = load_data("digits", model, input_size=16)
    assert torch.equal(again.test.targets, digits.test.targets)
    assert again.test[0][0].shape == (3, 16, 16)
    assert load_data(" Digits ", model, input_size=(3, 24, 20)).train[0][0].shape == (3, 24, 20)


def test_train_splits_are_disjoint_on_real_cifar10(model) -> None:
    """Calibration, validation and fine-tune index sets of the real CIFAR-10 training split
    are pairwise disjoint, cover it, and calibration is the search's calibration sample."""
    from tests.conftest import shared_path

    data = load_data(f"cifar10:{shared_path('data', 'cifar10')}", model)
    s = data.splits(1024, 2000, seed=0)
    cal, val, tune = (set(x.indices) for x in (s.calibration, s.validation, s.finetune))
    assert len(cal) == 1024 and len(val) == 2000 and len(tune) == 50000 - 3024
    assert not cal & val and not cal & tune and not val & tune
    assert cal | val | tune == set(range(50000))
    assert s.calibration.indices == data.calibration(1024, seed=0).indices
    assert np.bincount(data.train.targets[s.validation.indices].numpy()).tolist() == [200] * 10
    again = data.splits(1024, 2000, seed=0)
    assert again.validation.indices == s.validation.indices
    assert data.splits(1024, 2000, seed=1).validation.indices != s.validation.indices


def test_train_splits_refuse_too_small_a_split(digits) -> None:
    with pytest.raises(DataError, match="too few .* lower --calib or --val"):
        digits.splits(len(digits.train) - 10, 10)


def test_calibration_subset(digits) -> None:
    a = calibration_subset(digits.train, 100, seed=1)
    assert isinstance(a, Subset) and a.dataset is digits.train and len(a) == 100
    assert a.indices == calibration_subset(digits.train, 100, seed=1).indices
    assert a.indices == digits.calibration(100, seed=1).indices
    assert a.indices != calibration_subset(digits.train, 100, seed=2).indices
    assert a.indices == sorted(set(a.indices))
    assert np.bincount(digits.train.targets[a.indices].numpy()).tolist() == [10] * 10
    # drawn from train only: no calibration image is a test image
    test_images = {im.numpy().tobytes() for im in digits.test.images}
    assert not any(digits.train.images[i].numpy().tobytes() in test_images for i in a.indices)
    # loads through a DataLoader (Subset -> ArrayDataset.__getitems__)
    xb, yb = next(iter(loader(a, 100)))
    assert xb.shape == (100, 3, 32, 32) and torch.equal(yb, digits.train.targets[a.indices])
    # fewer samples than classes: uniform, still reproducible; n >= len: everything
    assert calibration_subset(digits.train, 3, seed=0).indices == (
        calibration_subset(digits.train, 3, seed=0).indices
    )
    assert len(calibration_subset(digits.train, 10_000)) == len(digits.train)
    with data_error("must be >= 1"):
        calibration_subset(digits.train, 0)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_x": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 20).astype(np.uint8),
        "test_x": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 6).astype(np.uint8),
    }


def write_npy(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in arrays.items():
        np.save(root / f"{name}.npy", value)
    return root


def write_batches(root: Path, arrays: dict[str, np.ndarray], protocol: int = 2) -> Path:
    """The layout of cifar-10-python.tar.gz: 5 train batches of [N, 3072] + a test batch."""
    root.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in y],
            b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),  # R, G, B planes
            b"filenames": [f"{i}.png".encode() for i in range(len(x))],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))

    for i, (x, y) in enumerate(
        zip(np.split(arrays["train_x"], 5), np.split(arrays["train_y"], 5)), start=1
    ):
        dump(f"data_batch_{i}", x, y)
    dump("test_batch", arrays["test_x"], arrays["test_y"])
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_both_formats_identical(tmp_path, model, cifar_arrays, protocol) -> None:
    npy = load_data(f"cifar10:{write_npy(tmp_path / 'npy', cifar_arrays)}", model)
    batches = load_data(f"cifar10:{write_batches(tmp_path / 'py', cifar_arrays, protocol)}", model)
    assert npy.classes == batches.classes == CIFAR10_CLASSES
    for split in ("train", "test"):
        a, b = getattr(npy, split), getattr(batches, split)
        assert len(a) == len(cifar_arrays[f"{split}_y"])
        assert torch.equal(a.targets, b.targets)
        assert a.targets.tolist() == cifar_arrays[f"{split}_y"].tolist()
        xa, _ = next(iter(loader(a, 64)))
        xb, _ = next(iter(loader(b, 64)))
        assert torch.equal(xa, xb)
    # pixel (row 3, col 5) of train image 7, channel G, normalised in one place
    want = (cifar_arrays["train_x"][7, 3, 5, 1] / 255 - 0.456) / 0.224
    assert npy.train[7][0][1, 3, 5].item() == pytest.approx(want, abs=1e-5)


def test_cifar10_nested_batches_dir_and_resize(tmp_path, model, cifar_arrays) -> None:
    write_batches(tmp_path / "cifar-10-batches-py", cifar_arrays)
    data = load_data(f"cifar10:{tmp_path}", model, input_size=64)
    assert len(data.train) == 20 and data.test[0][0].shape == (3, 64, 64)


def test_cifar10_shared_arrays(model) -> None:
    root = shared_path("data", "cifar10")
    data = load_data(f"cifar10:{root}", model)
    assert (len(data.train), len(data.test), data.num_classes) == (50_000, 10_000, 10)
    assert np.bincount(data.test.targets.numpy()).tolist() == [1000] * 10
    xb, _ = next(iter(loader(data.test, 1000)))
    raw = unnormalise(xb)
    assert 0.40 < raw.mean() < 0.55 and raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_cifar10_malicious_batch_refused(tmp_path, model, cifar_arrays) -> None:
    root = write_batches(tmp_path / "py", cifar_arrays)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = {b"data": Payload(), b"labels": [0]}
    (root / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with data_error("refused to load") as err:
        load_data(f"cifar10:{root}", model)
    msg = one_line(err)
    assert "data_batch_3" in msg and "system" in msg and "possibly malicious" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"csubprocess\nPopen\n((S'true'\nltR.",
        b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",  # only latin1 is how bytes are pickled
    ],
)
def test_cifar10_refuses_other_globals(tmp_path, model, cifar_arrays, payload) -> None:
    root = write_batches(tmp_path / "py", cifar_arrays)
    (root / "test_batch").write_bytes(payload)
    with data_error("refused to load .*test_batch") as err:
        load_data(f"cifar10:{root}", model)
    one_line(err)


# --------------------------------------------------------------------------- image folders


def write_imagefolder(root: Path, split_classes: dict[str, list[str]]) -> Path:
    colours = {"cat": (0, 0, 255), "dog": (255, 0, 0), "bird": (0, 255, 0)}
    for split, classes in split_classes.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                img = Image.new("RGB", (40 + i, 30), colours[name])
                img.save(root / split / name / f"{i}.{'png' if i else 'jpg'}")
    return root


def test_imagefolder(tmp_path, model) -> None:
    root = write_imagefolder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    Image.new("L", (20, 20), 255).save(root / "val" / "dog" / "grey.png")
    data = load_data(f"imagefolder:{root}", model, check_classes=False)
    assert data.classes == ("cat", "dog") and data.num_classes == 2
    assert (len(data.train), len(data.test)) == (6, 7)
    xb, yb = next(iter(loader(data.train, 8, num_workers=0)))
    assert xb.shape == (6, 3, 32, 32) and yb.tolist() == [0, 0, 0, 1, 1, 1]
    rgb = unnormalise(xb).mean(dim=(2, 3))
    assert torch.allclose(rgb[0], torch.tensor([0.0, 0.0, 1.0]), atol=0.02)  # blue cat
    assert torch.allclose(rgb[-1], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # red dog
    grey = unnormalise(data.test[-1][0])
    assert grey.shape == (3, 32, 32) and torch.allclose(grey, torch.ones(3, 32, 32), atol=1e-5)
    assert data.test[0][0].shape == (3, 32, 32)
    assert len(calibration_subset(data.train, 2, seed=0)) == 2
    small = load_data(f"imagefolder:{root}", model, input_size=(20, 24), check_classes=False)
    assert small.train[0][0].shape == (3, 20, 24)


# --------------------------------------------------------------------------- errors


def test_unknown_spec(model) -> None:
    with data_error("unknown data spec 'mnist:/data'") as err:
        load_data("mnist:/data", model)
    msg = one_line(err)
    assert "'digits'" in msg and "'cifar10:DIR'" in msg and "'imagefolder:DIR'" in msg


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("digits:/tmp", "'digits' takes no directory"),
        ("cifar10:", "names no directory; pass 'cifar10:DIR'"),
        ("imagefolder: ", "names no directory; pass 'imagefolder:DIR'"),
        ("cifar10:{tmp}/nowhere", "data directory not found: .*nowhere"),
        ("imagefolder:{tmp}/nowhere", "data directory not found"),
        ("cifar10:{tmp}/file.txt", "is not a directory"),
    ],
)
def test_spec_errors(tmp_path, model, spec, match) -> None:
    (tmp_path / "file.txt").write_text("x")
    with data_error(match) as err:
        load_data(spec.format(tmp=tmp_path), model)
    one_line(err)


def test_cifar10_empty_dir(tmp_path, model) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with data_error("no CIFAR-10 files in") as err:
        load_data(f"cifar10:{tmp_path}", model)
    msg = one_line(err)
    assert "train_x.npy" in msg and "test_y.npy" in msg and "data_batch_1" in msg
    assert "test_batch" in msg


def test_cifar10_incomplete(tmp_path, model, cifar_arrays) -> None:
    npy = write_npy(tmp_path / "npy", cifar_arrays)
    (npy / "test_y.npy").unlink()
    with data_error("incomplete CIFAR-10 .* lack test_y.npy") as err:
        load_data(f"cifar10:{npy}", model)
    one_line(err)
    py = write_batches(tmp_path / "py", cifar_arrays)
    (py / "data_batch_4").unlink()
    with data_error("lack data_batch_4") as err:
        load_data(f"cifar10:{py}", model)
    one_line(err)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: a["train_y"].__setitem__(3, 10), r"train_y.npy range over \d\.\.10, outside"),
        (lambda a: a.update(test_y=a["test_y"][:-1]), "6 images but test_y.npy 5 labels"),
        (lambda a: a.update(test_y=a["test_y"].astype(np.float32)), "expected integers"),
        (lambda a: a.update(train_x=a["train_x"][..., 0]), r"expected uint8 \[N, 32, 32, 3\]"),
        (lambda a: a.update(test_x=a["test_x"].astype(np.float32)), "holds float32"),
    ],
)
def test_cifar10_npy_mislabeled(tmp_path, model, cifar_arrays, edit, match) -> None:
    arrays = {k: v.copy() for k, v in cifar_arrays.items()}
    edit(arrays)
    with data_error(match) as err:
        load_data(f"cifar10:{write_npy(tmp_path, arrays)}", model)
    one_line(err)


def test_cifar10_npy_with_pickled_objects_refused(tmp_path, model, cifar_arrays) -> None:
    root = write_npy(tmp_path, cifar_arrays)
    np.save(root / "train_y.npy", np.array([object()] * 20), allow_pickle=True)
    with data_error("cannot read .*train_y.npy") as err:
        load_data(f"cifar10:{root}", model)
    one_line(err)


def test_cifar10_batches_mislabeled(tmp_path, model, cifar_arrays) -> None:
    arrays = {k: v.copy() for k, v in cifar_arrays.items()}
    arrays["test_y"] = arrays["test_y"].astype(np.int64)
    arrays["test_y"][0] = -1
    with data_error(r"test_batch range over -1\.\.\d, outside 0\.\.9") as err:
        load_data(f"cifar10:{write_batches(tmp_path / 'a', arrays)}", model)
    one_line(err)
    root = write_batches(tmp_path / "b", cifar_arrays)
    batch = {b"data": cifar_arrays["test_x"].reshape(6, -1), b"labels": [0, 1]}
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with data_error("has 6 images but 2 labels") as err:
        load_data(f"cifar10:{root}", model)
    one_line(err)
    (root / "test_batch").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with data_error("corrupt") as err:
        load_data(f"cifar10:{root}", model)
    one_line(err)


def test_imagefolder_errors(tmp_path, model) -> None:
    only_train = write_imagefolder(tmp_path / "a", {"train": ["cat", "dog"]})
    with data_error(r"needs DIR/train/<class>/ and DIR/val/<class>/; .*val not found") as err:
        load_data(f"imagefolder:{only_train}", model)
    one_line(err)

    differ = write_imagefolder(
        tmp_path / "b", {"train": ["cat", "dog"], "val": ["bird", "cat"]}
    )
    with data_error("class folders differ") as err:
        load_data(f"imagefolder:{differ}", model)
    msg = one_line(err)
    assert "only in train: ['dog']" in msg and "only in val: ['bird']" in msg

    empty = tmp_path / "c"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with data_error(r"no class folders in .*train; expected .*<class>/\*\.png\|jpg") as err:
        load_data(f"imagefolder:{empty}", model)
    one_line(err)

    no_images = write_imagefolder(tmp_path / "d", {"train": ["cat"], "val": ["cat"]})
    (no_images / "train" / "dog").mkdir()
    (no_images / "train" / "dog" / "notes.txt").write_text("x")
    with data_error(r"no images in .*train for class\(es\) dog") as err:
        load_data(f"imagefolder:{no_images}", model)
    one_line(err)


def test_array_dataset_length_mismatch() -> None:
    with data_error("3 images but 2 labels"):
        ArrayDataset(torch.zeros(3, 3, 4, 4), torch.zeros(2), preprocess=None)


def test_data_config_bad_input_size(model) -> None:
    assert data_config(model)["input_size"] == (3, 32, 32)
    with data_error("input size"):
        data_config(model, input_size=(1, 2, 3, 4))
