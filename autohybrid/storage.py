"""Optuna storage from one string: SQLite file (default), PostgreSQL/MySQL URL, or journal file.

RDB storages run a heartbeat so a worker killed mid-trial leaves no trial RUNNING forever:
its trial is failed after the grace period and retried with the same parameters.
"""

from __future__ import annotations

import random
import re
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage

from autohybrid.exceptions import ConfigError

__all__ = ["get_storage", "mask_url", "HEARTBEAT_S", "GRACE_S"]

HEARTBEAT_S = 10
GRACE_S = 30


def mask_url(url: str | None) -> str | None:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    if not url:
        return url
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def get_storage(spec: str | None, out_dir: str | Path) -> optuna.storages.BaseStorage:
    """Storage for ``spec``: None -> ``OUT/study.db``; ``journal:PATH`` or ``*.log`` ->
    journal file (shared filesystems); anything with ``://`` -> SQLAlchemy URL."""
    if spec is None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        spec = f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"
    if spec.startswith("journal:") or spec.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = spec.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in spec:
        raise ConfigError(
            f"storage {mask_url(spec)!r} is not a URL; use sqlite:///FILE, "
            "postgresql://USER:PASS@HOST/DB or journal:FILE"
        )
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry = retry or optuna.storages.RetryFailedTrialCallback
    for attempt in range(5):  # workers starting together race to create the tables
        try:
            return _rdb(spec, retry)
        except ConfigError:
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _rdb(spec: str, retry) -> RDBStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = retry(max_retry=2)
            return RDBStorage(
                spec,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=callback,
                engine_kwargs={"pool_pre_ping": True} if not spec.startswith("sqlite") else None,
            )
    except Exception as e:  # sqlalchemy / driver errors: connection refused, bad db, no driver
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = reason.replace(spec, mask_url(spec) or "")
        raise ConfigError(
            f"cannot open storage {mask_url(spec)!r}: {mask_url(reason)[:200]}; check the URL, "
            "that the server is running, and the driver (pip install 'psycopg[binary]')"
        ) from None
