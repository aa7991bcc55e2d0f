"""Atomic file output: write to a temporary file beside the target, then rename.

A reader (or a rerun after a crash) sees either the old file or the complete new one, never a
truncated one. Temporary files carry their writer's host and pid, so the leftovers of a killed
writer can be told from the files of a live one and removed (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "remove_stale_temps", "pid_alive"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        if os.path.exists(tmp):  # a writer may have made the file anew (safetensors: 0600)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())


def pid_alive(pid) -> bool:
    """Whether a process with this pid runs on this host (one of another user counts)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files under ``folder`` left by writers on this host that no longer
    run (a SIGKILL between write and rename); files of live writers and of other hosts stay.
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = re.compile(rf"\.{re.escape(_host())}-(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for f in folder.rglob(".*.tmp"):
        m = mine.search(f.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(m.group(1)):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
    return removed
