"""Engine acceptance on real timm models: exactness, budget, cost, save/load, ONNX."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch

import autohybrid as ah
from autohybrid.methods import HYBRID, METHODS, LowRankMethod

MODELS = {
    "mobilenetv3_small_100": ({}, (3, 64, 64)),
    "efficientnet_b0": ({}, (3, 64, 64)),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, (3, 32, 32)),
    "resnet18": ({}, (3, 64, 64)),
    "cifar_resnet20": ({}, (3, 32, 32)),
}


def make(name):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    if name.startswith("cifar_"):
        from autohybrid.models import create_model

        return create_model(name, **kwargs).eval(), size
    m = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    m.autohybrid_kwargs = kwargs
    return m, size


def full_allocation(inv):
    """Every compressible layer at full rank / zero sparsity, cycling through the methods."""
    layers = {}
    for i, layer in enumerate(inv.compressible):
        lowrank = [
            n
            for n, m in METHODS.items()
            if isinstance(m, LowRankMethod) and m.applies_to(layer) and n != "cp"
        ]
        if lowrank and i % 3 == 0:
            f = lowrank[i % len(lowrank)]
            layers[layer.name] = ah.LayerSpec(f, rank=METHODS[f].max_rank(layer))
        elif lowrank and i % 3 == 1:
            f = lowrank[0]
            layers[layer.name] = ah.LayerSpec(
                HYBRID, factorization=f, rank=(1,) * len(METHODS[f].max_rank(layer)), sparsity=0.0
            )
        else:
            layers[layer.name] = ah.LayerSpec("sparse", sparsity=0.0)
    return ah.Allocation.for_inventory(inv, layers)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_rank_zero_sparsity_reproduces_dense(name):
    model, size = make(name)
    inv = ah.inventory(model, size)
    small = ah.apply(model, full_allocation(inv))
    x = torch.randn(2, *size)
    with torch.no_grad():
        diff = (small(x) - model(x)).abs().max().item()
    assert diff <= 1e-4


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """Per model: the dense model, a uniform L+S at 0.3 params, the built model, its export."""
    out = {}
    for name in MODELS:
        model, size = make(name)
        inv = ah.inventory(model, size)
        alloc = ah.Allocation.uniform(inv, method=HYBRID, budget=0.3, metric="params")
        small = ah.apply(model, alloc)
        d = tmp_path_factory.mktemp(name)
        ah.export(small, alloc, d)
        out[name] = (model, size, inv, alloc, small, d)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_uniform_hybrid_budget_and_counted_cost(compressed, name):
    model, size, inv, alloc, small, _ = compressed[name]
    counted = alloc.cost(inv)
    measured = ah.cost(small, size)
    assert counted.params_fraction <= 0.3
    assert counted.params_fraction > 0.25  # lands just under, not far below
    assert counted.params == measured.params
    assert counted.macs == measured.macs
    nnz = sum(m.nnz for m in small.modules() if hasattr(m, "nnz"))
    stored = sum(p.numel() for p in small.parameters())
    assert stored == counted.params and nnz > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_export_load_reproduces_outputs(compressed, name):
    model, size, inv, alloc, small, d = compressed[name]
    again = ah.load(d)
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small.eval()(x), atol=1e-6, rtol=1e-6)
    # the file tracks the budget: within the counted storage plus buffers and header
    size_bytes = (d / "model.safetensors").stat().st_size
    counted = alloc.cost(inv).storage_bytes
    buffers = sum(
        b.numel() * b.element_size() for n, b in small.named_buffers() if not n.endswith("indices")
    )
    assert size_bytes <= counted + buffers + 64 * 1024
    assert size_bytes < 0.45 * 4 * inv.total_params + buffers + 64 * 1024
    # written with the usual permissions (the umask's), not the temporary file's 0600
    umask = os.umask(0)
    os.umask(umask)
    for f in ("model.safetensors", "allocation.yaml"):
        assert (d / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize(
    "name", ["mobilenetv3_small_100", "vit_tiny_patch16_224", "cifar_resnet20"]
)
def test_onnx_parity(compressed, name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, size, inv, alloc, small, d = compressed[name]
    path = ah.export_onnx(small, tmp_path / "m.onnx", size)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *size)
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = small(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # in its deploy forms (sparse parts precomputed, one L+S layer folded): no scatter left
    import onnx

    forms = {n: "dense" for n, s in list(alloc.layers.items())[:1]}
    alloc2 = ah.Allocation.from_dict({**alloc.to_dict(), "meta": {"deploy": {"forms": forms}}})
    fast = ah.export_onnx(small, tmp_path / "fast.onnx", size, alloc=alloc2, inv=inv)
    ops = {n.op_type for n in onnx.load(str(fast)).graph.node}
    assert "ScatterElements" not in ops and "ScatterND" not in ops, ops
    sess = ort.InferenceSession(str(fast), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_compressed_model_trains(compressed):
    """No custom autograd: gradients reach the factors and the sparse values."""
    model, size, inv, alloc, small, _ = compressed["cifar_resnet20"]
    small = small.train()
    loss = small(torch.randn(4, *size)).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for n, p in small.named_parameters() if n.endswith("values")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_apply_rejects_allocation_for_another_model(compressed):
    from autohybrid.exceptions import AllocationError

    _, _, _, alloc, _, _ = compressed["resnet18"]
    model, _ = make("mobilenetv3_small_100")
    with pytest.raises(AllocationError, match="not this 'mobilenetv3_small_100'"):
        ah.apply(model, alloc)


def test_cli_apply_with_data_refits_reproducibly(tmp_path, capsys):
    """``autohybrid apply --data`` fits ``fit: data`` layers to calibration images: the same
    data gives bit-identical weights, and they differ from the weight fit's (no --data)."""
    from safetensors.torch import load_file

    from autohybrid.cli.main import main
    from autohybrid.models import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10)
    ckpt = tmp_path / "r20.pth"
    torch.save(model.state_dict(), ckpt)
    inv = ah.inventory(model.eval(), (3, 32, 32))
    names = [la.name for la in inv.compressible][:4]
    layers = {n: ah.LayerSpec("sparse", sparsity=0.7, fit="data") for n in names}
    alloc = ah.Allocation.for_inventory(inv, layers)
    alloc.meta["calibration"] = {"n": 64, "seed": 3}
    alloc.save(tmp_path / "a.yaml")
    base = ["apply", "--model", "cifar_resnet20", "--checkpoint", str(ckpt),
            "--allocation", str(tmp_path / "a.yaml")]
    for out, extra in (("d1", ["--data", "digits"]), ("d2", ["--data", "digits"]), ("w", [])):
        assert main([*base, "--out", str(tmp_path / out), *extra]) == 0
    printed = capsys.readouterr().out
    assert "data fit on 64 calibration images of digits (seed 3)" in printed
    assert "without --data its layers get the weight fit" in printed
    d1, d2, w = (load_file(str(tmp_path / o / "model.safetensors")) for o in ("d1", "d2", "w"))
    key = f"{names[0]}.values"
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert not torch.equal(d1[key], w[key])


def _compress_direct(kwargs, size):
    """A ViT made with ``timm.create_model`` itself (no ``autohybrid_kwargs``), compressed."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    inv = ah.inventory(model.eval(), size)
    alloc = ah.Allocation.uniform(inv, method=HYBRID, budget=0.5, metric="params")
    return ah.apply(model, alloc), alloc


def test_export_load_timm_model_created_with_kwargs(tmp_path):
    """Issue 12 item 5: kwargs given to timm.create_model (img_size, depth) are recovered from
    the model, written to allocation.yaml and used by load; outputs are the same."""
    small, alloc = _compress_direct({"img_size": 64, "depth": 2}, (3, 64, 64))
    ah.export(small, alloc, tmp_path)
    saved = ah.Allocation.load(tmp_path / "allocation.yaml").model
    assert saved["kwargs"] == {"img_size": 64, "depth": 2}
    assert saved["preprocessing"]["input_size"] == [3, 64, 64]
    again = ah.load(tmp_path)
    assert again.patch_embed.img_size == (64, 64) and len(again.blocks) == 2
    assert tuple(again.pretrained_cfg["input_size"]) == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small.eval()(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"mlp_ratio": 2.0}, "layer fingerprint"),
        ({"global_pool": "avg"}, "module fc_norm: Identity vs LayerNorm"),
        ({"dynamic_img_size": True}, "<model>.dynamic_img_size: False vs True"),
    ],
)
def test_export_refuses_timm_model_whose_kwargs_are_unknown(tmp_path, kwargs, why):
    from autohybrid.exceptions import ModelError

    small, alloc = _compress_direct({"img_size": 32, "depth": 1, **kwargs}, (3, 32, 32))
    with pytest.raises(ModelError, match="autohybrid.create_model") as e:
        ah.export(small, alloc, tmp_path)
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "allocation.yaml").exists()
    # given the kwargs, it exports and loads
    small.autohybrid_kwargs = {"img_size": 32, "depth": 1, **kwargs}
    alloc.model["kwargs"] = small.autohybrid_kwargs
    ah.export(small, alloc, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ah.load(tmp_path)(x), small.eval()(x), atol=1e-6, rtol=1e-6)


def test_export_warns_when_known_kwargs_leave_an_attribute_different(tmp_path):
    """A runtime switch set after creation (here fused attention) cannot be rebuilt from
    kwargs; with the kwargs known that is a warning, not a refusal."""
    small, alloc = _compress_direct({"img_size": 32, "depth": 1}, (3, 32, 32))
    small.autohybrid_kwargs = alloc.model["kwargs"] = {"img_size": 32, "depth": 1}
    attn = small.blocks[0].attn
    attn.fused_attn = not attn.fused_attn
    with pytest.warns(UserWarning, match=r"fused_attn.*load\(path, model=\.\.\.\)"):
        ah.export(small, alloc, tmp_path)
    assert ah.Allocation.load(tmp_path / "allocation.yaml").model["kwargs"] == {
        "img_size": 32, "depth": 1}


def test_load_refuses_a_file_holding_nan(compressed, tmp_path):
    """A model that diverged and was exported anyway is refused at load, in one line naming
    the tensor, rather than returning a model that outputs NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    from autohybrid.exceptions import CheckpointError

    _, _, _, _, _, d = compressed["cifar_resnet20"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"NaN or inf values in 1 tensor.*{name}"):
        ah.load(bad)


@pytest.mark.parametrize("max_bytes", [2 << 30, 700_000])  # every layer kept / only the first
def test_sequential_fit_from_kept_dense_inputs_is_bit_identical(max_bytes):
    """The sequential fit with the dense model's layer inputs kept (``DenseInputs``: one full
    pass per batch instead of a cut forward per layer) builds the same weights, bit for bit,
    as with a cut forward of the dense model at every layer; so does a cache that kept only
    the layers that fit in its memory bound."""
    from dataclasses import replace

    from autohybrid.apply import DenseInputs
    from autohybrid.methods import spec_at
    from autohybrid.models import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    inv = ah.inventory(model, (3, 16, 16))
    x = torch.randn(40, 3, 16, 16)
    names = [la.name for la in inv if la.name.startswith(("layer1.", "layer2.0"))]
    specs = {n: replace(spec_at(inv[n], HYBRID if i % 2 else "sparse", 0.3,
                                factorization="tucker2"), fit="data")
             for i, n in enumerate(names)}
    alloc = ah.Allocation.for_inventory(inv, specs)
    kept = DenseInputs(model, names, x, batch_size=16, max_bytes=max_bytes)
    assert 0 < len(kept.kept) <= len(names)
    assert (len(kept.kept) == len(names)) == (max_bytes > 1 << 20)
    assert all(len(batches) == 3 for batches in kept.kept.values())  # 40 images by 16
    none = DenseInputs(model, [], x, batch_size=16)  # keeps nothing: every input cut anew
    a = ah.apply(model, alloc, inv=inv, calibration=x, batch_size=16, dense_inputs=none)
    b = ah.apply(model, alloc, inv=inv, calibration=x, batch_size=16, dense_inputs=kept)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
