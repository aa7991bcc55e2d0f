"""Issue 12 item 4: a wheel (``pip install .``, not editable) ships the built-in search spaces.

The wheel is built offline from a copy of the source tree and installed into a fresh venv that
sees the dependencies (torch, timm, ...) of the running environment but neither the source
tree nor its editable install. Not marked slow: it is part of the acceptance run (~10 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import autohybrid.search_space as ss
from autohybrid.exceptions import AutohybridError

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAMES = ["cifar_resnet20", "resnet18", "mobilenetv3_small_100", "efficientnet_b0",
               "vit_tiny_patch16_224", "no_such_model"]

# Run inside the installed venv: where autohybrid came from and what it loads.
PROBE = f"""
import json, autohybrid, autohybrid.search_space as ss
spaces = ss.builtin_spaces()
print(json.dumps({{
    "file": autohybrid.__file__,
    "dir": str(ss.SEARCH_SPACE_DIR),
    "spaces": {{n: ss.read_search_space(p).to_dict() for n, p in spaces.items()}},
    "picked": {{m: ss.load_search_space(m).digest for m in {MODEL_NAMES!r}}},
}}))
"""


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tree (the build writes nothing into the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("autohybrid", "search_spaces"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (whl,) = (tmp / "dist").glob("autohybrid-*.whl")
    return whl


def test_wheel_holds_every_module_and_search_space(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "autohybrid").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set(), "subpackages missing from the wheel: list them in pyproject"
    yamls = {f"autohybrid/search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml")}
    assert yamls and yamls <= names
    assert not any(n.startswith("search_spaces/") for n in names)  # not a top-level package


def test_wheel_install_loads_the_source_tree_spaces(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([str(py), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    # The dependencies of this environment, without its .pth files (the editable finder).
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "zz_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--target", str(purelib), str(wheel)], cwd=tmp_path)
    got = json.loads(_run([str(py), "-c", PROBE], cwd=tmp_path).splitlines()[-1])

    assert Path(got["file"]).resolve().is_relative_to(purelib.resolve())
    assert Path(got["dir"]).resolve().is_relative_to(purelib.resolve())
    want = {p.stem: ss.read_search_space(p).to_dict()
            for p in sorted((ROOT / "search_spaces").glob("*.yaml"))}
    assert sorted(got["spaces"]) == sorted(want)
    assert got["spaces"] == want
    assert got["picked"] == {m: ss.load_search_space(m).digest for m in MODEL_NAMES}
    assert got["picked"]["vit_tiny_patch16_224"] != got["picked"]["no_such_model"]


def test_source_tree_spaces_are_the_builtin_ones():
    """The development install (editable) reads the repository's search_spaces/."""
    assert Path(str(ss.SEARCH_SPACE_DIR)).resolve() == (ROOT / "search_spaces").resolve()
    assert set(ss.builtin_spaces()) == {p.stem for p in (ROOT / "search_spaces").glob("*.yaml")}


def test_no_builtin_space_is_an_error_not_an_empty_default(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "SEARCH_SPACE_DIR", tmp_path / "missing")
    with pytest.raises(ss.SearchSpaceMissingError, match="reinstall autohybrid") as e:
        ss.load_search_space("resnet18")
    assert isinstance(e.value, AutohybridError)
    monkeypatch.setattr(ss, "SEARCH_SPACE_DIR", tmp_path)  # present but empty
    with pytest.raises(ss.SearchSpaceMissingError):
        ss.builtin_spaces()
