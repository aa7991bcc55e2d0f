"""Contracts of autohybrid.finetune: learning, distillation, kept sparsity, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import autohybrid as ah
from autohybrid.data import load_data
from autohybrid.evaluate import evaluate
from autohybrid.exceptions import CheckpointError, ConfigError, DataError
from autohybrid.finetune import (
    CHECKPOINT_NAME,
    FinetuneConfig,
    augment,
    distill_loss,
    finetune,
    lr_at,
)
from autohybrid.layers import _SparseBase

SIZE = (3, 16, 16)


class DigitCNN(nn.Module):
    """Three conv + BN blocks and a head at 16x16; optional dropout to exercise the RNG."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def cnn(seed: int = 0, dropout: float = 0.0) -> DigitCNN:
    torch.manual_seed(seed)
    return DigitCNN(dropout)


# digits must not be flipped; 2 px of padding is the CIFAR 4 px scaled to 16x16
DIGITS = {"flip": False, "crop_padding": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a busy 2-core machine two intra-op threads wait on each other and
    run these tests ~40x slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", cnn(), input_size=16)


@pytest.fixture(scope="module")
def trained(digits):
    """A dense teacher trained from scratch on labels only, and the history of that run."""
    model = cnn(0)
    config = FinetuneConfig(epochs=2, batch_size=64, lr=3e-3, **DIGITS)
    history = finetune(model, None, digits.train, config, progress=False, eval_dataset=digits.test)
    return model, history


# --------------------------------------------------------------------------- config


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = FinetuneConfig(steps=10, optimizer="sgd", lr=0.05, flip=False, grad_clip=None)
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]") as e:
        FinetuneConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    for key in ("lr", "temperature", "alpha", "save_every", "flip"):
        assert repr(key) in str(e.value)  # the allowed keys are listed


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"optimizer": "adam"}, "['adamw', 'sgd']"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"epochs": 0}, "epochs=0"),
        ({"steps": 0}, "steps=0"),
        ({"lr": "fast"}, "lr='fast'"),
        ({"optimizer": "sgd", "momentum": 0.0}, "nesterov"),
    ],
)
def test_config_bad_values_say_what_to_do(bad, words) -> None:
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(**bad)
    assert words in str(e.value)


# --------------------------------------------------------------------------- pieces


def test_distill_loss_is_hinton_loss() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    p, q = torch.softmax(t / 4, -1), torch.softmax(s / 4, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ce = nn.functional.cross_entropy(s, y)
    expected = 0.7 * 16 * kl + 0.3 * ce
    torch.testing.assert_close(distill_loss(s, t, y, 4.0, 0.7), expected)
    torch.testing.assert_close(distill_loss(s, None, y), ce)
    assert float(distill_loss(t, t, y, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_augment_crops_and_flips_per_sample() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) + 1
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0, False, gen), x)
    flips = [augment(x, 0, True, gen) for _ in range(20)]
    for out in flips:
        for i in range(2):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert any(not torch.equal(out, x) for out in flips)
    out = augment(x, 2, False, gen)
    assert out.shape == x.shape
    for i in range(2):  # each sample is a window of its own zero-padded image
        padded = nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = padded.unfold(1, 4, 1).unfold(2, 4, 1)  # [C, 5, 5, 4, 4]
        assert any(torch.equal(windows[:, r, c], out[i]) for r in range(5) for c in range(5))


def test_lr_warms_up_then_decays_to_zero() -> None:
    config = FinetuneConfig(lr=0.1, warmup=0.1)
    lrs = [lr_at(s, 100, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 1e-3


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss(trained, digits) -> None:
    model, history = trained
    assert history["steps"] == history["steps_run"] == 2 * (len(digits.train) // 64)
    assert history["resumed_from"] == 0 and history["epochs"] == 2.0
    assert len(history["train_loss"]) == 2
    assert history["train_loss"][1] < history["train_loss"][0] - 0.2
    assert history["top1"] > 40  # chance is 10 %
    assert not model.training


def test_compressed_student_gets_closer_and_keeps_its_sparsity(trained, digits) -> None:
    teacher, _ = trained
    inv = ah.inventory(teacher, SIZE)
    alloc = ah.Allocation.uniform(inv, method="lowrank+sparse", budget=0.4)
    student = ah.apply(teacher, alloc)
    sparse = {n: m for n, m in student.named_modules() if isinstance(m, _SparseBase)}
    assert sparse, "the allocation should give the student sparse branches"
    indices = {n: m.indices.clone() for n, m in sparse.items()}
    values = {n: m.values.detach().clone() for n, m in sparse.items()}
    params = sum(p.numel() for p in student.parameters())
    cost = ah.cost(student, SIZE)
    teacher_before = copy.deepcopy(teacher.state_dict())
    before = evaluate(student, digits.test, progress=False, reference=teacher)

    config = FinetuneConfig(epochs=1, batch_size=64, **DIGITS)
    history = finetune(
        student, teacher, digits.train, config, progress=False, eval_dataset=digits.test
    )

    assert history["agreement"] > before["agreement"] + 5
    assert history["kl"] < before["kl"]
    assert not student.training and not teacher.training
    for name, m in sparse.items():
        assert torch.equal(m.indices, indices[name]), f"{name}: sparsity pattern moved"
        assert not torch.equal(m.values, values[name]), f"{name}: sparse values did not train"
    assert sum(p.numel() for p in student.parameters()) == params
    assert ah.cost(student, SIZE) == cost
    for key, value in teacher.state_dict().items():  # the teacher is never touched
        assert torch.equal(value, teacher_before[key]), key


# --------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def _stop_at(step_to_stop: int):
    def on_step(step: int, loss: float) -> None:
        if step == step_to_stop:
            raise Interrupt

    return on_step


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_after_interruption_gives_identical_weights(optimizer, digits, tmp_path) -> None:
    train = Subset(digits.train, range(200))  # 6 steps of 32 per epoch
    teacher = cnn(1)
    config = FinetuneConfig(
        steps=14, batch_size=32, optimizer=optimizer, lr=0.01, save_every=4, crop_padding=2
    )

    reference = cnn(2, dropout=0.3)  # dropout + augment + BN: every RNG stream matters
    full = finetune(reference, teacher, train, config, progress=False)

    student = cnn(2, dropout=0.3)
    with pytest.raises(Interrupt):  # dies after step 11: the last checkpoint is step 8
        finetune(student, teacher, train, config, tmp_path, progress=False, on_step=_stop_at(11))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 8
    assert (tmp_path / "finetune.yaml").exists()

    rerun = cnn(3, dropout=0.3)  # a fresh process would build the student again
    resumed = finetune(rerun, teacher, train, config, tmp_path, progress=False)
    assert resumed["resumed_from"] == 8 and resumed["steps_run"] == 6
    assert resumed["train_loss"] == full["train_loss"]
    ref_state = reference.state_dict()
    for key, value in rerun.state_dict().items():
        assert torch.equal(value, ref_state[key]), key

    again = finetune(cnn(4, dropout=0.3), teacher, train, config, tmp_path, progress=False)
    assert again["steps_run"] == 0 and again["train_loss"] == full["train_loss"]


def test_stop_at_then_continue_is_one_uninterrupted_run(digits, tmp_path) -> None:
    """Fine-tunes stopped at a rung and continued later (successive halving) end with the
    weights of one uninterrupted run: the schedule is the whole run's at every step."""
    train = Subset(digits.train, range(200))
    teacher = cnn(1)
    config = FinetuneConfig(steps=14, batch_size=32, lr=0.01, crop_padding=2)
    reference = cnn(2, dropout=0.3)
    full = finetune(reference, teacher, train, config, progress=False)
    for stop in (0, 3, 9):
        student = cnn(2, dropout=0.3)
        part = finetune(student, teacher, train, config, tmp_path, progress=False, stop_at=stop)
        assert part["step"] == stop
    last = cnn(5, dropout=0.3)
    rest = finetune(last, teacher, train, config, tmp_path, progress=False)
    assert rest["resumed_from"] == 9 and rest["step"] == 14
    assert rest["train_loss"] == full["train_loss"]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, last.state_dict()[key]), key


def test_frozen_batchnorm_keeps_the_dense_model_under_pure_distillation(digits) -> None:
    """A student equal to its teacher, distilled only (alpha 1) with BatchNorm frozen, sees
    (to rounding) zero gradient: the dense control is left as it was."""
    train = Subset(digits.train, range(96))
    teacher = cnn(1).eval()
    student = copy.deepcopy(teacher)
    config = FinetuneConfig(steps=3, batch_size=32, lr=0.01, alpha=1.0, bn="frozen",
                            optimizer="sgd", **DIGITS)  # Adam would blow rounding up
    finetune(student, teacher, train, config, progress=False)
    for key, value in teacher.state_dict().items():
        assert torch.allclose(student.state_dict()[key].float(), value.float(), atol=1e-6), key
    moved = copy.deepcopy(teacher)
    finetune(moved, teacher, train, FinetuneConfig(steps=3, batch_size=32, lr=0.01, alpha=1.0,
                                                   optimizer="sgd", **DIGITS), progress=False)
    assert any(not torch.equal(moved.state_dict()[k], v)
               for k, v in teacher.state_dict().items())  # train-mode BN does move it


def test_resume_refuses_a_checkpoint_from_another_run(digits, tmp_path) -> None:
    train = Subset(digits.train, range(64))
    config = FinetuneConfig(steps=2, batch_size=32, **DIGITS)
    finetune(cnn(0), None, train, config, tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"config keys \['lr'\] differ"):
        finetune(
            cnn(0),
            None,
            train,
            FinetuneConfig(steps=2, batch_size=32, lr=0.1, **DIGITS),
            tmp_path,
            progress=False,
        )
    with pytest.raises(CheckpointError, match="does not fit this student"):
        finetune(
            nn.Sequential(nn.Flatten(), nn.Linear(768, 10)),
            None,
            train,
            config,
            tmp_path,
            progress=False,
        )
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it to start over"):
        finetune(cnn(0), None, train, config, tmp_path, progress=False)


def test_bad_data_is_reported(digits) -> None:
    with pytest.raises(DataError, match="empty"):
        finetune(cnn(0), None, Subset(digits.train, []), progress=False)
    five = nn.Sequential(nn.Flatten(), nn.Linear(768, 5))
    with pytest.raises(DataError, match="5 outputs"):
        finetune(five, None, digits.train, FinetuneConfig(steps=1, **DIGITS), progress=False)
