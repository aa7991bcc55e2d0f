"""`autohybrid finetune`: an exported compressed model (or an allocation applied on the spot)
distilled from its dense teacher on digits, exported as `apply` exports, resumable."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import autohybrid as ah
from autohybrid.cli.main import main

SIZE = ["--input-size", "3", "8", "8"]  # cifar_resnet20 at 8x8: fast on two busy cores
TRAIN = ["--data", "digits", "--steps", "4", "--batch-size", "64", "--seed", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dense checkpoint, an allocation of sparse and low-rank layers, and `apply`'s export."""
    from autohybrid.models import create_model

    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    torch.save(model.state_dict(), d / "r20.pth")
    inv = ah.inventory(model, (3, 8, 8))
    names = [la.name for la in inv.compressible]
    layers = {n: ah.LayerSpec("sparse", sparsity=0.6) for n in names[:6]}
    layers.update({n: ah.LayerSpec("tucker2", rank=[8, 8]) for n in names[6:9]})
    ah.Allocation.for_inventory(inv, layers).save(d / "a.yaml")
    dense = ["--model", "cifar_resnet20", "--checkpoint", str(d / "r20.pth"), *SIZE]
    assert main(["apply", *dense, "--allocation", str(d / "a.yaml"), "--out", str(d / "e")]) == 0
    return d, dense


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_exported_model_is_finetuned_and_exported(setup, tmp_path, capsys):
    d, dense = setup
    capsys.readouterr()
    out = tmp_path / "f"
    assert main(["finetune", "--exported", str(d / "e"), *dense, *TRAIN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    before = re.search(r"before: top-1 ([\d.]+) %  loss ([\d.]+)  agreement", printed)
    after = re.search(r"after:  top-1 ([\d.]+) %  loss ([\d.]+)  agreement", printed)
    assert before and after and "fine-tuned 4 steps" in printed, printed
    # the file apply writes, the same structure, other values
    start, end = weights(d / "e"), weights(out)
    assert start.keys() == end.keys()
    masks = [k for k in start if k.endswith((".mask", ".idx32"))]
    assert masks and all(torch.equal(start[k], end[k]) for k in masks)  # sparsity kept
    assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith(".values"))
    assert (out / "allocation.yaml").read_text() == (d / "e" / "allocation.yaml").read_text()
    assert not list(out.rglob("*.tmp"))
    # the printed "after" is what the exported model scores
    from autohybrid.data import load_data
    from autohybrid.evaluate import evaluate

    small = ah.load(out)
    result = evaluate(small, load_data("digits", small, input_size=(3, 8, 8)).test,
                      progress=False)
    assert f"{result['top1']:.2f}" == after.group(1)
    assert f"{result['loss']:.4f}" == after.group(2)

    # a rerun finds the finished run in OUT/finetune/: no steps, the same weights
    assert main(["finetune", "--exported", str(d / "e"), *dense, *TRAIN, "--out", str(out)]) == 0
    assert "already fine-tuned: 4 steps" in capsys.readouterr().out
    again = weights(out)
    assert all(torch.equal(end[k], again[k]) for k in end)


def test_allocation_is_applied_then_finetuned_like_apply_then_finetune(setup, tmp_path):
    """--allocation compresses as `apply` does: same weights as apply + finetune --exported."""
    d, dense = setup
    via_export, direct = tmp_path / "x", tmp_path / "y"
    assert main(["finetune", "--exported", str(d / "e"), *dense, *TRAIN,
                 "--out", str(via_export)]) == 0
    assert main(["finetune", "--allocation", str(d / "a.yaml"), *dense, *TRAIN,
                 "--out", str(direct)]) == 0
    a, b = weights(via_export), weights(direct)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_labels_only_needs_no_dense_model(setup, tmp_path, capsys):
    d, _ = setup
    out = tmp_path / "z"
    assert main(["finetune", "--exported", str(d / "e"), "--no-teacher", *SIZE, "--data",
                 "digits", "--steps", "2", "--batch-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement" not in printed and "after:  top-1" in printed
    assert (out / "model.safetensors").is_file()
