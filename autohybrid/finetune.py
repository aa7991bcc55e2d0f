"""Short fine-tune of a compressed model, distilling from the dense one; resumable.

The student learns from the teacher's softened outputs and from the labels::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * CE(student, labels)

Compressed layers are plain torch modules, so training them needs nothing special: a sparse
branch trains its ``values`` at fixed ``indices`` (a buffer), so the sparsity pattern, the
parameter count and the cost stay exactly as allocated.

Runs are deterministic for a seed (on CPU) and resumable: with a ``checkpoint_dir`` the full
training state is saved atomically every ``save_every`` steps, and a rerun picks up from it and
ends with the same weights, bit for bit, as a run that was never interrupted. Everything that
decides a step is either saved (weights, optimizer, RNG states, step) or a pure function of the
step (learning rate, data order), as in nanoGPT's ``train.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from autohybrid.progress import bar as progress_bar

from .data import ArrayDataset
from .exceptions import CheckpointError, ConfigError, DataError, ModelError
from .io import atomic_path, atomic_write_text

__all__ = ["CHECKPOINT_NAME", "FinetuneConfig", "augment", "distill_loss", "finetune", "lr_at"]

CHECKPOINT_NAME = "finetune_state.pt"
CONFIG_NAME = "finetune.yaml"
OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("train", "frozen")


@dataclass
class FinetuneConfig:
    """How to fine-tune. Round-trips to a dict (and so YAML); unknown keys are rejected.

    ``weight_decay`` defaults to 0: the factors and sparse values start as the best fit to the
    dense weights, and decay on a product of factors acts as a rank-shrinking (nuclear-norm)
    penalty and on sparse values as shrinkage of exactly the entries chosen for being large;
    a short run needs neither, and the teacher's soft targets already regularise.
    """

    epochs: float = 1.0  # passes over the training set; may be fractional
    steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate, after warmup
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with a linear ramp up, then cosine to 0
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the distillation term; 0 trains on labels only
    augment: bool = True  # random crop (zero padding) on the normalised batch
    crop_padding: int = 4
    flip: bool = True  # random horizontal flip with augment; off for digits and text
    grad_clip: float | None = 5.0  # max gradient norm; None for no clipping
    bn: str = "train"  # train: BatchNorm in train mode (batch statistics, running stats
    # updated); frozen: BatchNorm in eval mode (running statistics, affine still trained)
    save_every: int | None = None  # checkpoint every N steps (and every epoch, and at the end)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> ConfigError:
            return ConfigError(f"fine-tune {key}={getattr(self, key)!r}: {want}")

        def number(key: str) -> float:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(key, "expected a finite number")
            return v

        def integer(key: str, low: int, optional: bool = False) -> None:
            v = getattr(self, key)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(key, f"expected an integer >= {low}" + (" or null" if optional else ""))

        if number("epochs") <= 0:
            raise bad("epochs", "expected > 0 (fractions allowed, e.g. 0.5)")
        integer("steps", 1, optional=True)
        integer("batch_size", 1)
        integer("crop_padding", 0)
        integer("save_every", 1, optional=True)
        integer("seed", 0)
        if self.bn not in BN_MODES:
            raise bad("bn", f"use one of {list(BN_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"use one of {list(OPTIMIZERS)}")
        if number("lr") <= 0:
            raise bad("lr", "expected > 0, e.g. 1e-3 for adamw or 0.01 for sgd")
        if not 0 <= number("momentum") < 1:
            raise bad("momentum", "expected in [0, 1)")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise bad("nesterov", "nesterov needs momentum > 0; set momentum or nesterov: false")
        if number("weight_decay") < 0:
            raise bad("weight_decay", "expected >= 0")
        if not 0 <= number("warmup") < 1:
            raise bad("warmup", "expected a fraction of the steps in [0, 1)")
        if number("temperature") <= 0:
            raise bad("temperature", "expected > 0, e.g. 4")
        if not 0 <= number("alpha") <= 1:
            raise bad("alpha", "expected in [0, 1]: 1 distils only, 0 uses labels only")
        if self.grad_clip is not None and number("grad_clip") <= 0:
            raise bad("grad_clip", "expected > 0, or null for no clipping")
        for key in ("nesterov", "augment", "flip"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "expected true or false")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "fine-tune config") -> FinetuneConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {names}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- pieces


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """Hinton's loss: ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's. Without a
    teacher the loss is the cross-entropy alone.
    """
    ce = F.cross_entropy(student, labels)
    if teacher is None or alpha == 0:
        return ce
    t = temperature
    log_q = F.log_softmax(student / t, dim=-1)
    log_p = F.log_softmax(teacher.detach() / t, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * ce


def augment(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after ``padding`` px of zeros, and an optional horizontal flip, per sample.

    Works on the normalised batch [N, C, H, W], so the padding is the mean colour. One gather
    for the whole batch; the random draws come from ``generator`` (CPU) for reproducibility.
    """
    n, _, h, w = x.shape
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
        padded = F.pad(x, (padding,) * 4)
        rows = (offsets[0, :, None] + torch.arange(h)).to(x.device)  # [N, H]
        cols = (offsets[1, :, None] + torch.arange(w)).to(x.device)  # [N, W]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def lr_at(step: int, total: int, config: FinetuneConfig) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``: linear warmup, then cosine to 0."""
    warm = math.ceil(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Decay (when asked) on weights and sparse values, never on biases and norm parameters."""
    from .layers import _SparseBase

    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            weight = p.ndim >= 2 or (isinstance(module, _SparseBase) and name == "values")
            (decay if weight else no_decay).append(p)
    if not decay and not no_decay:
        raise ModelError("the student has no trainable parameters; nothing to fine-tune")
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0))
        if params
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    return torch.optim.AdamW(groups, lr=config.lr)


def _epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch, whole batches only (the remainder is dropped).

    A pure function of (seed, epoch), so resuming mid-epoch needs no generator state.
    """
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(state))
    return order[: (n // batch_size) * batch_size].tolist()


def _batches(dataset: Dataset, order: list[int], batch_size: int) -> DataLoader:
    """Batches of ``dataset`` in ``order``; in-memory data loads in the main process.

    The DataLoader gets its own generator: without one, every new iterator draws its base
    seed from the global RNG, which would shift dropout's random stream on a mid-epoch resume.
    """
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    workers = 0 if isinstance(base, ArrayDataset) else min(4, os.cpu_count() or 1)
    return DataLoader(
        Subset(dataset, order), batch_size, num_workers=workers, generator=torch.Generator()
    )


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "augment": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["augment"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated by hand, or not ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read fine-tune checkpoint {path} ({first[:120]}); delete it to start over"
        ) from None


def _check_resumable(state: dict[str, Any], config: FinetuneConfig, n: int, path: Path) -> None:
    saved, now = state.get("config", {}), config.to_dict()
    keys = (set(saved) | set(now)) - {"save_every"}  # when to save does not change the result
    diff = sorted(k for k in keys if saved.get(k) != now.get(k))
    if diff or state.get("num_samples") != n:
        what = f"config keys {diff}" if diff else f"{state.get('num_samples')} samples, not {n}"
        raise ConfigError(
            f"{path} is from another fine-tune run ({what} differ); use another checkpoint "
            "directory, or delete the file to start over"
        )


# --------------------------------------------------------------------------- the loop


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_dataset: Dataset,
    config: FinetuneConfig | dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    eval_dataset: Dataset | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student`` in place against ``teacher`` (frozen) on ``train_dataset``.

    Args:
        student: the (compressed) model to train; trained in train mode (BatchNorm statistics
            update as usual) and left in eval mode.
        teacher: the dense model, run in eval mode without gradients (its mode is restored);
            None trains on labels only.
        train_dataset: items (normalised image [C, H, W], label), e.g. ``load_data(...).train``.
        config: a ``FinetuneConfig`` or its dict; defaults to ``FinetuneConfig()``.
        checkpoint_dir: where to keep ``finetune_state.pt`` (and ``finetune.yaml``). A run
            finding a checkpoint there resumes from it; one finding a finished run does no steps.
        progress: show a progress bar with the loss and ETA.
        eval_dataset: if given, measure the result on it (``evaluate``, teacher as reference).
        on_step: called as ``on_step(step, loss)`` after every step (1-based) and its checkpoint.
        stop_at: stop after this many steps of the run (checkpointed there); a later call with
            a larger ``stop_at`` (or none) continues the same run: the learning-rate schedule
            is always that of the whole run, so stopping and continuing changes nothing.

    Returns:
        ``steps`` (total), ``step`` (where this call stopped), ``steps_run`` (by this call),
        ``resumed_from``, ``steps_per_epoch``, ``epochs``, ``train_loss`` (mean loss per epoch,
        the last maybe partial), ``loss`` (its last entry), ``seconds`` (this call),
        ``config``; with ``eval_dataset`` also ``top1``, ``eval_loss``, and ``agreement`` /
        ``kl`` against the teacher.

    Raises:
        ConfigError: a bad config, or a checkpoint from a different run.
        CheckpointError: an unreadable checkpoint, or one that does not fit the student.
        DataError: empty data, or labels the student has no output for.
    """
    config = config if config is not None else FinetuneConfig()
    if isinstance(config, dict):
        config = FinetuneConfig.from_dict(config)
    n = len(train_dataset)
    if n == 0:
        raise DataError("no training samples; the fine-tune dataset is empty")
    batch_size = min(config.batch_size, n)
    per_epoch = max(1, n // batch_size)
    total = config.steps or max(1, math.ceil(config.epochs * per_epoch - 1e-9))
    save_every = config.save_every or per_epoch
    until = total if stop_at is None else max(0, min(int(stop_at), total))
    device = _device(student)
    t0 = time.perf_counter()

    torch.manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    optimizer = _optimizer(student, config)
    step, loss_sums, loss_counts = 0, [0.0], [0]  # per-epoch running sums

    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if path is not None and path.exists():
        state = _load(path)
        _check_resumable(state, config, n, path)
        try:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path} does not fit this student ({str(e).splitlines()[0][:160]}); "
                "use the same compressed model, or delete the file to start over"
            ) from None
        _set_rng_state(state["rng"], device, aug_gen)
        step = int(state["step"])
        loss_sums, loss_counts = list(state["loss_sums"]), list(state["loss_counts"])
        if progress and step < until:
            tqdm.write(f"finetune: resuming from {path} at step {step} of {total}")
    elif path is not None:
        atomic_write_text(path.parent / CONFIG_NAME, _yaml(config.to_dict()))
    resumed_from = step

    def checkpoint() -> None:
        _save(
            path,
            {
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(device, aug_gen),
                "step": step,
                "loss_sums": loss_sums,
                "loss_counts": loss_counts,
                "config": config.to_dict(),
                "num_samples": n,
            },
        )

    teacher_mode = teacher.training if teacher is not None else False
    use_teacher = teacher is not None and config.alpha > 0
    bar = progress_bar(total=until, initial=min(step, until), desc="finetune", unit="step",
                       progress=progress)
    try:
        if teacher is not None:
            teacher.eval()
        _train_mode(student, config.bn)
        while step < until:
            epoch, first = divmod(step, per_epoch)
            order = _epoch_order(n, batch_size, config.seed, epoch)[first * batch_size :]
            batches = _batches(train_dataset, order, batch_size)
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device).long()
                if config.augment:
                    x = augment(x, config.crop_padding, config.flip, aug_gen)
                soft = None
                if use_teacher:
                    with torch.no_grad():
                        soft = teacher(x.to(_device(teacher))).to(device).float()
                logits = student(x).float()
                _check_outputs(logits, soft, y)
                loss = distill_loss(logits, soft, y, config.temperature, config.alpha)
                lr = lr_at(step, total, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                value = float(loss.detach())
                loss_sums[-1] += value
                loss_counts[-1] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sums[-1] / loss_counts[-1]:.4f}", lr=f"{lr:.2e}")
                end_of_epoch = step % per_epoch == 0
                if end_of_epoch and step < total:
                    loss_sums.append(0.0)
                    loss_counts.append(0)
                if path is not None and (step % save_every == 0 or end_of_epoch
                                         or step in (total, until)):
                    checkpoint()
                if on_step is not None:
                    on_step(step, value)
                if step >= until:
                    break
    finally:
        bar.close()
        student.eval()
        if teacher is not None:
            teacher.train(teacher_mode)

    losses = [s / c for s, c in zip(loss_sums, loss_counts) if c]
    history: dict[str, Any] = {
        "steps": total,
        "step": step,
        "steps_run": step - resumed_from,
        "resumed_from": resumed_from,
        "steps_per_epoch": per_epoch,
        "epochs": total / per_epoch,
        "train_loss": losses,
        "loss": losses[-1] if losses else float("nan"),
        "seconds": time.perf_counter() - t0,
        "config": config.to_dict(),
    }
    if eval_dataset is not None:
        from .evaluate import evaluate

        result = evaluate(student, eval_dataset, progress=progress, reference=teacher)
        history.update(top1=result["top1"], eval_loss=result["loss"])
        if teacher is not None:
            history.update(agreement=result["agreement"], kl=result["kl"])
    return history


def _train_mode(model: nn.Module, bn: str) -> None:
    """Train mode; with ``bn="frozen"`` every BatchNorm stays in eval mode (running stats)."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                m.eval()


def _check_outputs(logits: torch.Tensor, soft: torch.Tensor | None, y: torch.Tensor) -> None:
    classes = logits.shape[-1]
    if soft is not None and soft.shape != logits.shape:
        raise ModelError(
            f"teacher outputs {list(soft.shape)} but student {list(logits.shape)}; distil "
            "from the dense model the student was compressed from"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataError(
            f"labels range over {int(y.min())}..{int(y.max())} but the student has {classes} "
            "outputs; use a model with one output per class of the data (--num-classes)"
        )


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
