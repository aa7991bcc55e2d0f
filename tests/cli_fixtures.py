"""Files for the bad-input table in docs/errors.md (written into a temporary folder)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

import autohybrid as ah
from autohybrid.models import create_model


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch /tmp/autohybrid-pwned",))


def make_fixtures(d: Path) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    r20 = create_model("cifar_resnet20")
    torch.save(r20.state_dict(), d / "r20.th")
    nan = {k: v.clone() for k, v in r20.state_dict().items()}
    nan["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.th")
    torch.save({"state_dict": create_model("cifar_resnet56").state_dict()}, d / "r56.th")
    torch.save(create_model("cifar_resnet20", num_classes=100).state_dict(), d / "r20_c100.th")
    (d / "empty.th").write_bytes(b"")
    (d / "corrupt.th").write_bytes(b"\x00garbage" * 100)
    with open(d / "hostile.th", "wb") as f:
        pickle.dump(Hostile(), f)
    inv = ah.inventory(r20, (3, 32, 32))
    alloc = ah.Allocation.uniform(inv, budget=0.5)
    alloc.save(d / "r20.yaml")
    (d / "malformed.yaml").write_text("version: 1\nlayers: [unclosed\n")
    mnv = create_model("mobilenetv3_small_050", num_classes=10)
    ah.Allocation.uniform(ah.inventory(mnv, (3, 32, 32)), budget=0.5).save(d / "other.yaml")
    d_unknown = alloc.to_dict()
    d_unknown["layers"]["layer9.0.conv1"] = {"method": "sparse", "sparsity": 0.5}
    _yaml(d / "unknown_layer.yaml", d_unknown)
    d_rank = alloc.to_dict()
    d_rank["layers"]["layer1.0.conv1"] = {"method": "tucker2", "rank": [64, 64]}
    _yaml(d / "bad_rank.yaml", d_rank)
    d_sp = alloc.to_dict()
    d_sp["layers"]["layer1.0.conv1"] = {"method": "sparse", "sparsity": 1.5}
    _yaml(d / "bad_sparsity.yaml", d_sp)
    d_fit = alloc.to_dict()
    d_fit["layers"]["layer1.0.conv1"] = {"method": "sparse", "sparsity": 0.5, "fit": "exact"}
    _yaml(d / "bad_fit.yaml", d_fit)
    d_ok = alloc.to_dict()
    d_ok["layers"]["layer1.0.conv1"] = {"method": "sparse", "sparsity": 0.5, "fit": "data"}
    _yaml(d / "fit_data.yaml", d_ok)
    (d / "space.yaml").write_text("name: mine\ncolour: red\n")
    (d / "empty_dir").mkdir(exist_ok=True)
    bad = d / "mislabeled"
    bad.mkdir(exist_ok=True)
    for split, n in (("train", 20), ("test", 10)):
        np.save(bad / f"{split}_x.npy", np.zeros((n, 32, 32, 3), np.uint8))
        np.save(bad / f"{split}_y.npy", np.full(n, 12, np.uint8))
    return {"FIX": str(d)}


def _yaml(path: Path, doc: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
