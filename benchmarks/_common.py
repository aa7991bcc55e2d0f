"""Helpers shared by the benchmark scripts: machine description, tables, RESULTS sections.

Not part of the library and not imported by it; the scripts put ``benchmarks/`` on the path
by being run as ``python benchmarks/<script>.py``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS_engine.md"
SHARED = ROOT.parent / "shared"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# What the caller set, before a script adds its own defaults (import this module first).
USER_ENV = {k: os.environ[k] for k in _THREAD_VARS if k in os.environ}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    """One line: cores, CPU model, torch version, BLAS thread settings."""
    import numpy
    import torch

    env = ", ".join(f"{k}={os.environ[k]}" for k in _THREAD_VARS if k in os.environ)
    return (
        f"nproc {os.cpu_count()}, CPU `{cpu_model()}`, torch {torch.__version__}, "
        f"numpy {numpy.__version__}, Python {platform.python_version()}"
        + (f", env {env}" if env else "")
    )


def command_line() -> str:
    """The command that ran this script, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    env = " ".join(f"{k}={v}" for k, v in USER_ENV.items())
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", str(script), *sys.argv[1:]])
    return f"{env} {cmd}".strip()


@functools.cache
def library_fingerprint() -> str:
    """sha256 (12 hex) of the autohybrid sources this run imported: the library changes under
    concurrent development, and a result belongs to the code that produced it."""
    import hashlib

    import autohybrid

    pkg = Path(autohybrid.__file__).parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub-markdown table; ``align`` is one char per column (l/r), default right."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return (
            "| "
            + " | ".join(
                c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
            for w, a in zip(widths, align)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_section(title: str, body: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the ``## title`` section of the results file with ``body``."""
    head = (
        "# autohybrid engine benchmarks\n\nRecorded by the scripts in `benchmarks/`; each "
        "section says which command, when and on what machine.\n"
    )
    text = path.read_text() if path.exists() else head
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
    return path


def provenance(elapsed_s: float | None = None, load: tuple[str, str] | None = None) -> str:
    lines = [
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Date: {now()}",
        f"- Machine: {machine()}",
        f"- autohybrid sources: sha256 {library_fingerprint()} (all `autohybrid/**/*.py`, "
        "hashed when the run started)",
    ]
    if load:
        lines.append(
            f"- Load average (1/5/15 min) at start: {load[0]}; at end: {load[1]} "
            "(other jobs share this machine)"
        )
    if elapsed_s is not None:
        lines.append(f"- Wall time of the whole run: {elapsed_s:.0f} s")
    return "\n".join(lines)
