"""Contracts of autohybrid.models: registered CIFAR ResNets, checkpoints, their errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from autohybrid.exceptions import CheckpointError, ModelError
from autohybrid.models import create_model, load_checkpoint, preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_MODELS = SHARED / "models" / "cifar10"
CIFAR_DATA = SHARED / "data" / "cifar10"


def shared_file(path: Path) -> Path:
    """``path`` under ../shared, or skip the test when it is absent."""
    if not path.exists():
        pytest.skip(f"../shared not found: {path} is missing (development data, not shipped)")
    return path


@pytest.fixture(scope="module")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    x = np.load(shared_file(CIFAR_DATA / "test_x.npy"))
    y = np.load(shared_file(CIFAR_DATA / "test_y.npy"))
    return x, y


def correct(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> int:
    """Number of correct top-1 predictions, preprocessing as ``preprocessing(model)`` says."""
    cfg = preprocessing(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2).float() / 255
            pred = model((xb - mean) / std).argmax(1)
            hits += int((pred == torch.from_numpy(y[i : i + batch]).long()).sum())
    return hits


# --------------------------------------------------------------------------- CIFAR ResNets

NAMES = [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)]


def test_registered_with_timm() -> None:
    assert set(NAMES) <= set(timm.list_models("cifar_resnet*"))


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg(name: str) -> None:
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    assert cfg["architecture"] == name
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert cfg["num_classes"] == 10
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    ("name", "params"), [("cifar_resnet20", 269_722), ("cifar_resnet56", 853_018)]
)
def test_param_count(name: str, params: int) -> None:
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_forward_and_classifier_api() -> None:
    model = create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 64, 8, 8)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    assert model.get_classifier() is model.linear and model.num_classes == 10
    model.reset_classifier(100)
    assert model(x).shape == (2, 100) and model.num_classes == 100
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_shortcut_has_no_parameters() -> None:
    model = create_model("cifar_resnet20")
    assert not any(".shortcut" in k for k in model.state_dict())


def test_num_classes_and_kwargs_recorded() -> None:
    model = create_model("cifar_resnet20", num_classes=100, in_chans=1)
    assert model.linear.out_features == 100
    assert model.autohybrid_kwargs == {"in_chans": 1}
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 100)


def test_preprocessing() -> None:
    cfg = preprocessing(create_model("cifar_resnet56"))
    assert cfg == {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


# --------------------------------------------------------------------------- shared checkpoints


@pytest.mark.parametrize(
    ("name", "file", "hits"),
    [
        ("cifar_resnet20", "resnet20-12fca82f.th", 9173),
        # ~70 s on 2 CPU cores
        pytest.param("cifar_resnet56", "resnet56-4bfd9763.th", 9339, marks=pytest.mark.slow),
    ],
)
def test_akamaster_checkpoint_accuracy(name: str, file: str, hits: int, cifar_test) -> None:
    """The published checkpoints reproduce 91.73 % / 93.39 % exactly."""
    path = shared_file(CIFAR_MODELS / file)
    model = create_model(name, checkpoint=path)
    assert correct(model, *cifar_test) == hits


def test_load_checkpoint_returns_metadata() -> None:
    path = shared_file(CIFAR_MODELS / "resnet20-12fca82f.th")
    meta = load_checkpoint(create_model("cifar_resnet20"), path)
    assert set(meta) == {"best_prec1"}


@pytest.mark.parametrize(
    "file", ["mobilenetv3_small_100-cifar10.pth", "vit_tiny_p8_d6-cifar10.pth"]
)
def test_timm_checkpoint_accuracy(file: str, cifar_test) -> None:
    """Name, kwargs, class count and normalisation all come from the file."""
    path = shared_file(CIFAR_MODELS / file)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(saved["model"], checkpoint=path)
    assert model.autohybrid_kwargs == saved["kwargs"]
    assert model.num_classes == 10
    assert preprocessing(model)["mean"] == pytest.approx(saved["normalize"]["mean"])
    assert preprocessing(model)["std"] == pytest.approx(saved["normalize"]["std"])
    if "img_size" in saved["kwargs"]:
        assert preprocessing(model)["input_size"] == (3, 32, 32)
    x, y = cifar_test
    acc = 100 * correct(model, x[:2000], y[:2000]) / 2000
    assert abs(acc - 100 * saved["test_acc"]) < 3


def test_checkpoint_for_another_model(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save({"model": "vit_tiny_patch16_224", "state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="saved from model 'vit_tiny_patch16_224'"):
        create_model("cifar_resnet20", checkpoint=path)


def test_num_classes_inferred_from_classifier(tmp_path: Path) -> None:
    path = tmp_path / "c100.pt"
    torch.save(create_model("cifar_resnet20", num_classes=100).state_dict(), path)
    assert create_model("cifar_resnet20", checkpoint=path).linear.out_features == 100


# --------------------------------------------------------------------------- checkpoint layouts


@pytest.fixture
def resnet20() -> nn.Module:
    return create_model("cifar_resnet20").eval()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"model_state": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    ],
    ids=["plain", "state_dict", "model", "model_state", "module_prefix"],
)
def test_checkpoint_layouts(wrap, resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(resnet20.state_dict()), path)
    other = create_model("cifar_resnet20").eval()
    meta = load_checkpoint(other, path)
    assert meta in ({}, {"epoch": 3})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), resnet20(x))


def test_old_batchnorm_checkpoint(resnet20: nn.Module, tmp_path: Path) -> None:
    """Checkpoints from before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked."""
    path = tmp_path / "old.pth"
    g = torch.Generator().manual_seed(0)
    state = {k: (v + torch.rand(v.shape, generator=g) if "running" in k else v)  # not the init
             for k, v in resnet20.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, path)
    source = create_model("cifar_resnet20").eval()
    source.load_state_dict(state, strict=False)
    other = create_model("cifar_resnet20").eval()
    load_checkpoint(other, path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), source(x))  # every weight and statistic
    assert all(int(v) == 0 for k, v in other.state_dict().items() if "num_batches" in k)


def test_safetensors(resnet20: nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "ckpt.safetensors"
    save_file(resnet20.state_dict(), str(path), metadata={"test_acc": "0.9"})
    other = create_model("cifar_resnet20").eval()
    assert load_checkpoint(other, path) == {"test_acc": 0.9}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), resnet20(x))


# --------------------------------------------------------------------------- errors


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError) as error:
        create_model("cifar_resnet21")
    message = one_line(error)
    assert "'cifar_resnet21'" in message
    assert "cifar_resnet20" in message
    assert "timm.list_models()" in message


def test_missing_file(resnet20: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as error:
        load_checkpoint(resnet20, tmp_path / "nope.pth")
    assert "nope.pth" in one_line(error)


def test_empty_file(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match="empty") as error:
        load_checkpoint(resnet20, path)
    one_line(error)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint\n" * 4, b"\x80\x02garbage" * 8, b"PK\x03\x04truncated zip"],
    ids=["text", "bad_pickle", "bad_zip"],
)
def test_corrupt_file(content: bytes, resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a .*checkpoint|corrupt") as error:
        load_checkpoint(resnet20, path)
    one_line(error)


def test_truncated_checkpoint(resnet20: nn.Module, tmp_path: Path) -> None:
    full, path = tmp_path / "full.pth", tmp_path / "half.pth"
    torch.save(resnet20.state_dict(), full)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as error:
        load_checkpoint(resnet20, path)
    one_line(error)


def test_corrupt_safetensors(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt") as error:
        load_checkpoint(resnet20, path)
    one_line(error)


def test_not_a_state_dict(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(resnet20, path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_checkpoint(resnet20, path)


class Hostile:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_refused(resnet20: nn.Module, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"state_dict": Hostile(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(resnet20, path)
    message = one_line(error)
    assert "execute code" in message and "not a plain tensor checkpoint" in message
    assert "torch.save(model.state_dict()" in message and "safetensors" in message
    assert not marker.exists()


def test_pickled_module_refused(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(resnet20, path)
    with pytest.raises(CheckpointError, match="refused") as error:
        load_checkpoint(resnet20, path)
    assert "torch.save(model.state_dict()" in one_line(error)


def test_missing_and_unexpected_keys(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "keys.pth"
    state = dict(resnet20.state_dict())
    for k in [k for k in state if k.startswith("layer3.")]:
        state[k.replace("layer3.", "stage3.")] = state.pop(k)
    torch.save(state, path)
    # BatchNorm's num_batches_tracked may be absent (old checkpoints); it is not reported.
    missing = [
        k
        for k in resnet20.state_dict()
        if k.startswith("layer3.") and not k.endswith("num_batches_tracked")
    ]
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(resnet20, path)
    message = one_line(error)
    assert f"{len(missing)} missing keys" in message
    assert "unexpected keys" in message
    assert "layer3.0.conv1.weight" in message and "stage3.0.conv1.weight" in message
    assert f"{len(missing) - 5} more" in message


def test_shape_mismatch(resnet20: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "c100.pth"
    torch.save(create_model("cifar_resnet20", num_classes=100).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(resnet20, path)
    message = one_line(error)
    assert "linear.weight: checkpoint [100, 64] vs model [10, 64]" in message
    assert "linear.bias: checkpoint [100] vs model [10]" in message
    assert "wrong --num-classes or architecture?" in message


def test_shape_mismatch_with_explicit_num_classes(tmp_path: Path) -> None:
    path = tmp_path / "c10.pth"
    torch.save(create_model("cifar_resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"checkpoint \[10, 64\] vs model \[100, 64\]"):
        create_model("cifar_resnet20", num_classes=100, checkpoint=path)


def test_bad_kwargs() -> None:
    with pytest.raises(ModelError, match="cannot build 'cifar_resnet20'"):
        create_model("cifar_resnet20", widht=2)


def test_demo_model_is_the_same_whatever_the_thread_count(tmp_path: Path, monkeypatch) -> None:
    """The demo model trains on one thread: a machine with more cores caches the same weights
    (with two threads it did not, and every demo number moved by a point or two)."""
    import autohybrid.demo as demo

    monkeypatch.setattr(demo, "EPOCHS", 1)  # the same code, 23 steps instead of 460
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            monkeypatch.setenv("AUTOHYBRID_CACHE", str(tmp_path / f"threads-{n}"))
            path = demo.demo_checkpoint(progress=False)
            assert torch.get_num_threads() == n  # the caller's setting is restored
            weights.append(torch.load(path, weights_only=True)["state_dict"])
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
