"""The built-in demo model: a small MobileNetV3 trained once on scikit-learn's digits, cached.

``autohybrid search --budget 0.2`` with no model uses it, so a fresh machine can run the whole
pipeline with nothing downloaded. Training takes under a minute on one CPU core; it runs on
one thread whatever the machine has, so the core count does not change it (PyTorch's
CPU kernels sum in an order that depends on the thread count, and a trained network carries
that difference into every number the demo prints).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from autohybrid.config import DEMO_MODEL
from autohybrid.io import atomic_path
from autohybrid.progress import bar as progress_bar

__all__ = ["demo_checkpoint", "demo_settings", "demo_config", "DEMO_INPUT", "DEMO_DATA"]

DEMO_INPUT = (3, 32, 32)
DEMO_DATA = "digits"
EPOCHS = 20


# The demo's own settings, under the user's: digits is tiny (1437 training images), so 256
# calibration and 300 validation images, and a 320-step halving ladder at a higher rate
# (10 candidates: 192 steps for the winner; it reaches 97.2 % on the digits test split).
DEMO_SETTINGS = {"model": DEMO_MODEL, "data": DEMO_DATA, "input_size": list(DEMO_INPUT),
                 "calib": 256, "val": 300, "finetune_budget": 320, "finetune_lr": 1e-3}


def demo_settings(progress: bool = True) -> dict:
    """The demo's settings, its checkpoint included (trained on first use)."""
    return {**DEMO_SETTINGS, "checkpoint": str(demo_checkpoint(progress))}


def demo_config(**overrides):
    """The built-in demo as a ``SearchConfig``; ``overrides`` win over its settings."""
    from autohybrid.config import SearchConfig

    return SearchConfig.from_dict({**demo_settings(), **overrides}, "demo")


def cache_dir() -> Path:
    root = os.environ.get("AUTOHYBRID_CACHE") or Path.home() / ".cache" / "autohybrid"
    return Path(root)


def demo_checkpoint(progress: bool = True) -> Path:
    """Path of the trained demo checkpoint; trains and caches it on first use."""
    path = cache_dir() / "demo" / f"{DEMO_MODEL}-digits.pth"
    if path.is_file():
        return path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(path, progress)
    finally:
        torch.set_num_threads(threads)
    return path


def _train(path: Path, progress: bool) -> None:
    from autohybrid.data import as_tensors, load_data
    from autohybrid.evaluate import evaluate
    from autohybrid.models import create_model

    torch.manual_seed(0)
    model = create_model(DEMO_MODEL, num_classes=10)
    data = load_data(DEMO_DATA, model, input_size=DEMO_INPUT)
    x, y = as_tensors(data.train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = EPOCHS * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    bar = progress_bar(range(EPOCHS), desc=f"training demo model {DEMO_MODEL} on digits",
                       progress=progress)
    for _ in bar:
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    acc = evaluate(model.eval(), data.test, progress=False)["top1"]
    cfg = model.pretrained_cfg
    with atomic_path(path) as tmp:
        torch.save({
            "model": DEMO_MODEL, "kwargs": {}, "num_classes": 10,
            "input_size": list(DEMO_INPUT), "state_dict": model.state_dict(),
            "normalize": {"mean": list(cfg["mean"]), "std": list(cfg["std"])},
            "test_acc": acc / 100,
        }, tmp)
