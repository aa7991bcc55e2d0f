"""SearchConfig: every knob of ``autohybrid search``, as a dataclass that round-trips to YAML.

Precedence: defaults < ``--config FILE`` < command-line flags. The resolved config is saved
beside every output as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autohybrid.exceptions import ConfigError
from autohybrid.io import atomic_write_text

__all__ = ["SearchConfig", "SAMPLERS", "BACKENDS", "DEMO_MODEL"]

SAMPLERS = ("nsga2", "tpe", "gp")
BACKENDS = ("optuna", "ray")
QUALITY_SIGNALS = ("kl", "loss", "disagreement")
DEMO_MODEL = "mobilenetv3_small_100"
RUNTIMES = ("torch", "onnxruntime")  # latency's targets (autohybrid.latency)
FINETUNE_BUDGET = 800  # default fine-tune steps of the selection ladder (two CPU cores)


def check_keys(cls, d, source: str) -> None:
    """A YAML mapping for dataclass ``cls``: unknown keys are an error naming the allowed."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping at the top")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(names)}")


@dataclass
class SearchConfig:
    """What to search, on what, and how hard. ``model=None`` runs the built-in demo."""

    model: str | None = None
    checkpoint: str | None = None
    num_classes: int | None = None
    model_args: dict = field(default_factory=dict)
    input_size: list[int] | None = None
    data: str = "digits"
    budget: float = 0.2
    metric: str = "params"  # params | macs (flops) | latency (measured on runtime)
    runtime: str = "torch"  # latency's target: torch (eager, CPU) | onnxruntime (CPU)
    latency_batch: int = 1  # the batch size the latency budget is measured at
    threads: int | None = None  # latency's thread count (default: torch's, as run)
    latency_margin: float = 0.03  # the search aims this much under a latency budget
    speed: bool = True  # time every result beside the dense model (pareto.csv's latency)
    search_space: str | None = None
    out: str = "autohybrid-out"
    storage: str | None = None
    study_name: str | None = None
    sampler: str = "nsga2"
    backend: str = "optuna"
    ray_address: str | None = None
    concurrency: int = 1
    resume: bool = False
    trials: int = 40
    population: int = 16
    seed: int = 0
    calib: int = 1024
    batch_size: int = 256
    bn_recal: str = "auto"
    recal_images: int = 256
    quality: str = "kl"
    fit: str = "data"
    damp: float = 0.01
    saliency: str = "obs"
    max_groups: int = 24
    screen: bool = True
    local_search: float = 0.3
    val: int | None = None  # validation images held out from the training split (every
    # choice is made on them); None: 1000, or a fifth of a smaller training split
    candidates: int = 6  # trials the selection stage fine-tunes (successive halving); 0: none
    eta: int = 3  # halving factor: each rung keeps the top 1/eta for eta times more steps
    finetune_budget: int | None = None  # fine-tune steps of the whole ladder (default 800;
    # 0: no fine-tune, the candidate with the best validation top-1 as fitted is returned)
    finetune_epochs: float | None = None  # or: the winner's full fine-tune, in epochs ...
    finetune_steps: int | None = None  # ... or in steps (the ladder's cost follows)
    finetune_lr: float = 3e-4
    device: str = "auto"  # fine-tunes and validation: auto (a GPU when present) | cpu | cuda
    test_limit: int | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> SearchConfig:
        check_keys(cls, d, source)
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> SearchConfig:
        return cls.from_dict(cls.read(path), str(path))

    @classmethod
    def read(cls, path: str | Path) -> dict:
        """The settings a YAML file gives, and only those (for layering: defaults < file <
        flags); unknown keys rejected."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{path}: malformed YAML; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got "
                              f"{type(data).__name__}; fix the file")
        check_keys(cls, data, str(path))
        return data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from autohybrid.storage import mask_url

        d = self.to_dict()
        d["storage"] = mask_url(d["storage"]) if d["storage"] else None
        return atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))

    def finetune_recipe(self) -> dict:
        """``FinetuneConfig`` settings of every fine-tune the search runs."""
        return {"lr": self.finetune_lr, "seed": self.seed}

    def validate(self) -> None:
        from autohybrid.allocation import check_budget
        from autohybrid.cost import normalize_metric

        check_budget(self.budget)
        self.metric = normalize_metric(self.metric)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; use one of {list(SAMPLERS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; use one of {list(BACKENDS)}")
        if self.quality not in QUALITY_SIGNALS:
            raise ConfigError(
                f"unknown quality signal {self.quality!r}; use one of {list(QUALITY_SIGNALS)}"
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; use one of {list(RUNTIMES)}")
        if self.runtime == "onnxruntime" and self.metric == "latency":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ConfigError("--runtime onnxruntime needs ONNX Runtime: pip install "
                                  "'autohybrid[onnx]'") from None
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        if isinstance(self.latency_margin, bool) or not isinstance(
                self.latency_margin, (int, float)) or not 0.0 <= self.latency_margin < 0.5:
            raise ConfigError(f"latency_margin is the share of a latency budget kept in "
                              f"reserve for measurement noise, from 0 to below 0.5 (e.g. "
                              f"0.03); got {self.latency_margin!r}")
        for key in ("trials", "calib", "batch_size", "population", "concurrency", "max_groups",
                    "latency_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.local_search, (int, float)) or isinstance(self.local_search, bool) \
                or not 0.0 <= self.local_search < 1.0:
            raise ConfigError(f"local_search is the share of --trials spent on local moves, "
                              f"from 0 (off) to below 1; got {self.local_search!r}")
        from autohybrid.fit import SALIENCIES
        from autohybrid.spec import FITS

        if self.fit not in FITS:
            raise ConfigError(f"unknown fit {self.fit!r}; use one of {list(FITS)} (data: fit "
                              "each layer to its outputs on the calibration images)")
        if self.saliency not in SALIENCIES:
            raise ConfigError(f"unknown saliency {self.saliency!r}; use one of "
                              f"{list(SALIENCIES)}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) \
                or not 0 < self.damp <= 1:
            raise ConfigError(f"damp is the damping relative to mean(diag H), in (0, 1]; got "
                              f"{self.damp!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) \
                or self.candidates < 0:
            raise ConfigError(f"candidates must be an integer >= 0 (0: no selection stage), "
                              f"got {self.candidates!r}")
        for key in ("val", "finetune_budget", "finetune_steps"):
            v = getattr(self, key)
            low = 0 if key == "finetune_budget" else 1  # 0: no fine-tune, rung 0 decides
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"{key} must be an integer >= {low}, got {v!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise ConfigError(f"eta is the halving factor, an integer >= 2; got {self.eta!r}")
        epochs = self.finetune_epochs
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                                   or epochs <= 0):
            raise ConfigError(f"finetune_epochs must be > 0, got {self.finetune_epochs!r}")
        if self.finetune_steps is not None and self.finetune_epochs is not None:
            raise ConfigError("give the winner's fine-tune as finetune_steps or finetune_epochs, "
                              "not both")
        if self.finetune_budget is not None and (self.finetune_steps is not None
                                                 or self.finetune_epochs is not None):
            raise ConfigError("give --finetune-budget (the whole ladder's steps) or the winner's "
                              "--finetune-steps / --finetune-epochs, not both: one sets the other")
