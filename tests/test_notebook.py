"""notebooks/quickstart.ipynb runs top to bottom, in this venv's interpreter, on every CI run.

Executed with nbclient + ipykernel alone (no Jupyter server). The kernel is a temporary
kernelspec whose argv is ``sys.executable``: a ``python3`` kernelspec found elsewhere on the
machine could start a different interpreter, one without autohybrid installed.

The notebook reads the demo model from the usual cache (``~/.cache/autohybrid`` or
``$AUTOHYBRID_CACHE``), shared with ``autohybrid search``; on a cold cache one of its cells
trains it (one to two minutes on 2 CPU cores), hence the generous timeouts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "autohybrid-test-venv"


def venv_kernelspec(jupyter_dir: Path) -> str:
    """Write a kernelspec running this interpreter under ``jupyter_dir``; return its name."""
    spec = jupyter_dir / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"autohybrid tests ({sys.executable})",
        "language": "python",
    }))
    return KERNEL


def test_committed_notebook_is_clean_and_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert NOTEBOOK.stat().st_size < 200_000
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), (
        "commit the notebook without outputs: clear them before committing"
    )


@pytest.mark.timeout(900)
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("AUTOHYBRID_QUICKSTART_OUT", str(out))
    kernel = venv_kernelspec(tmp_path / "jupyter")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = "import sys\nprint(sys.executable)\nprint(sys.prefix)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))  # which interpreter ran the kernel
    client = NotebookClient(nb, kernel_name=kernel, timeout=600, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError, with the traceback, on any cell error
    finally:  # kept in tmp_path for a failed run's post-mortem
        nbformat.write(nb, tmp_path / "quickstart.executed.ipynb")

    ran = nb.cells[-1].outputs[0]["text"].splitlines()
    here = [sys.executable, sys.prefix]
    assert [os.path.abspath(p) for p in ran] == [os.path.abspath(p) for p in here]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the sensitivity heatmap and the Pareto plot, each shown once
    for name in ("search/pareto.csv", "search/report.html", "search/study.db",
                 "model/model.safetensors", "model/allocation.yaml"):
        assert (out / name).is_file(), name
