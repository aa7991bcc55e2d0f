"""One exception family. Every message names the bad value and says what to do next.

The CLI turns any ``AutohybridError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class AutohybridError(Exception):
    """Base class for every error the tool reports to a user."""


class ConfigError(AutohybridError, ValueError):
    """A bad option, budget, metric, YAML file or search space."""


class ModelError(AutohybridError):
    """Unknown model name, or a checkpoint that does not fit the model."""


class CheckpointError(ModelError):
    """A checkpoint file that is missing, corrupt, unsafe or for another model."""


class AllocationError(AutohybridError, ValueError):
    """An allocation that does not fit the model: unknown layers, bad ranks, other model."""


class MethodError(AutohybridError, ValueError):
    """A method or spec that does not apply to a layer."""


class DataError(AutohybridError):
    """Missing, empty, mislabeled or unknown data."""


class BudgetError(ConfigError):
    """A budget that is malformed or cannot be reached."""
