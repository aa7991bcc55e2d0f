"""Measure a model on a dataset, optionally against a dense reference; re-estimate BatchNorm.

``evaluate`` reports top-1 accuracy and cross-entropy, and with a ``reference`` (the dense
model, or its logits computed once with ``keep_logits=True``) how far a compressed model has
drifted from it: KL(reference || model) and top-1 agreement. ``recalibrate_bn`` refreshes the
BatchNorm running statistics after layers have been replaced, which alone often recovers much
of the accuracy a compression loses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from autohybrid.progress import bar as progress_bar

from .data import loader
from .exceptions import DataError

__all__ = ["evaluate", "recalibrate_bn", "estimating", "Scores"]


@dataclass
class Scores:
    """Running sums over batches: loss and top-1 against the labels and, with reference
    logits, KL(reference || model) and top-1 agreement. The one place these are computed
    (``evaluate``, the sensitivity analysis and the search's trial scores all add to it)."""

    n: int = 0
    loss: float = 0.0
    correct: int = 0
    kl: float = 0.0
    agree: int = 0
    referenced: bool = False

    def add(self, logits: torch.Tensor, labels: torch.Tensor,
            ref: torch.Tensor | None = None) -> None:
        logp = F.log_softmax(logits, 1)
        self.n += len(labels)
        self.loss += float(F.nll_loss(logp, labels, reduction="sum"))
        self.correct += int((logits.argmax(1) == labels).sum())
        if ref is not None:
            ref_logp = F.log_softmax(ref, 1)
            self.referenced = True
            self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())

    def as_dict(self) -> dict:
        n = max(self.n, 1)
        out = {"loss": self.loss / n, "top1": 100.0 * self.correct / n}
        if self.referenced:
            out.update(kl=self.kl / n, agreement=100.0 * self.agree / n)
        return out


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 256,
    progress: bool = True,
    reference: nn.Module | torch.Tensor | None = None,
    keep_logits: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy and loss of ``model`` on ``data``, and its distance to a reference.

    Args:
        model: a classifier returning logits; run in eval mode, its previous mode restored.
        data: a Dataset (loaded in order, ``batch_size`` at a time) or a DataLoader.
        batch_size: batch size when ``data`` is a Dataset.
        progress: show a progress bar.
        reference: a dense model, or its logits [N, classes] on the same data in the same
            order; adds ``kl`` and ``agreement``.
        keep_logits: also return the model's logits [N, classes] (CPU) under ``logits``, to
            serve as a later ``reference``.
        device: where to run; defaults to the model's device.

    Returns:
        ``top1`` (percent), ``loss`` (mean cross-entropy), ``n``; with a reference ``kl``
        (mean KL(reference || model) of the softmax outputs, nats) and ``agreement`` (percent of
        samples whose top-1 class matches the reference's).

    Raises:
        DataError: empty data, labels the model has no output for, or reference logits that do
            not match the data.
    """
    device = torch.device(device) if device is not None else _device(model)
    batches = _as_loader(data, batch_size)
    ref_logits = reference if isinstance(reference, torch.Tensor) else None
    ref_model = reference if isinstance(reference, nn.Module) else None
    if reference is not None and ref_logits is None and ref_model is None:
        raise DataError(
            f"reference must be a model or a logits tensor, got {type(reference).__name__}"
        )
    modes = [(m, m.training) for m in (model, ref_model) if m is not None]
    scores = Scores()
    kept: list[torch.Tensor] = []
    bar = progress_bar(batches, desc="evaluate", unit="batch", progress=progress, leave=False)
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            for batch in bar:
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device).long()
                logits = model(x).float()
                _check_targets(y, logits.shape[-1])
                ref = _reference_logits(ref_model, ref_logits, model, x, logits, scores.n)
                scores.add(logits, y, None if ref is None else ref.to(logits.device).float())
                if keep_logits:
                    kept.append(logits.cpu())
                bar.set_postfix(top1=f"{100.0 * scores.correct / scores.n:.2f}")
    finally:
        bar.close()
        for m, training in modes:
            m.train(training)
    n = scores.n
    if n == 0:
        raise DataError("no samples to evaluate; the dataset or loader is empty")
    if ref_logits is not None and len(ref_logits) != n:
        raise DataError(
            f"reference logits hold {len(ref_logits)} rows but the data has {n} samples; "
            "compute them on the same data, in the same order"
        )
    result: dict[str, Any] = {**scores.as_dict(), "n": n}
    if keep_logits:
        result["logits"] = torch.cat(kept)
    return result


def recalibrate_bn(
    model: nn.Module,
    data: Dataset | DataLoader,
    batches: int | None = 100,
    batch_size: int = 256,
    progress: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``data`` (in place) and return model.

    Statistics are reset and accumulated as a plain average over the batches (momentum None),
    with only the BatchNorm layers in train mode: dropout and the like stay off, no gradients
    and no weights change. The model's previous mode and the BN momenta are restored.

    Args:
        model: the network; BatchNorm layers without running stats are left alone.
        data: training data, a Dataset (shuffled with ``seed``) or a DataLoader (used as is).
        batches: how many batches to use at most; None for all.
        batch_size: batch size when ``data`` is a Dataset.
        progress: show a progress bar.
        seed: shuffling seed when ``data`` is a Dataset.
        device: where to run; defaults to the model's device.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    device = torch.device(device) if device is not None else _device(model)
    empty = DataError("no data to recalibrate BatchNorm on; the dataset or loader is empty")
    if isinstance(data, DataLoader):
        batch_iter = data
    elif len(_as_dataset(data)) == 0:
        raise empty
    else:
        batch_iter = loader(data, batch_size, shuffle=True, seed=seed)
    total = len(batch_iter) if hasattr(batch_iter, "__len__") else None
    if total == 0:
        raise empty
    if batches is not None and total is not None:
        total = min(total, batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), estimating(norms):
            bar = progress_bar(batch_iter, total=total, desc="recalibrate BN", unit="batch",
                               progress=progress, leave=False)
            for i, batch in enumerate(bar):
                if batches is not None and i >= batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device, non_blocking=True))
            bar.close()
    finally:
        model.train(was_training)
    return model


@contextmanager
def estimating(norms):
    """BatchNorm layers ``norms`` re-estimating their running statistics inside the block:
    reset, averaged over every batch seen (momentum None), in train mode; their momenta and
    eval mode come back after. The one BatchNorm recalibration of the package
    (``recalibrate_bn``, the sensitivity table's per-candidate re-estimate)."""
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches seen
        bn.train()
    try:
        yield norms
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
            bn.eval()


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return param.device if param is not None else torch.device("cpu")


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    hint = " pass data.test (or data.train)" if hasattr(data, "train") else ""
    raise DataError(f"expected a torch Dataset or DataLoader, got {type(data).__name__};{hint}")


def _as_loader(data: Any, batch_size: int) -> DataLoader:
    return data if isinstance(data, DataLoader) else loader(_as_dataset(data), batch_size)


def _check_targets(y: torch.Tensor, num_outputs: int) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_outputs):
        raise DataError(
            f"labels range over {int(y.min())}..{int(y.max())} but the model has {num_outputs} "
            "outputs; use a model with one output per class of the data (--num-classes)"
        )


def _reference_logits(
    ref_model: nn.Module | None,
    ref_logits: torch.Tensor | None,
    model: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: int,
) -> torch.Tensor | None:
    """This batch's reference logits: the model's own, a reference model's, or a slice."""
    if ref_model is model:
        return logits
    if ref_model is not None:
        return ref_model(x.to(_device(ref_model)))
    if ref_logits is None:
        return None
    ref = ref_logits[offset : offset + len(x)]
    if ref.shape != logits.shape:
        raise DataError(
            f"reference logits {list(ref_logits.shape)} do not match the model's outputs on "
            f"the data (batch at {offset}: {list(logits.shape)}); compute them on the same "
            "data, in the same order, with the same classes"
        )
    return ref
