"""Every row of docs/errors.md: the command prints exactly that one line, exits 2, and leaves
no output files behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autohybrid.cli.main import main
from tests.cli_fixtures import make_fixtures

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| (?P<what>[^|]+) \| `autohybrid (?P<cmd>[^`]+)` \| (?P<msg>.+) \|$")


def rows():
    out = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            out.append((m["what"].strip(), m["cmd"].strip(), m["msg"].strip().replace("\\|", "|")))
    return out


@pytest.fixture(scope="module")
def fix(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("fix"))


def test_table_has_every_bad_input():
    assert len(rows()) >= 24


@pytest.mark.parametrize("what,cmd,msg", rows(), ids=[r[0] for r in rows()])
def test_bad_input_gives_one_line_and_exit_2(fix, what, cmd, msg, capsys, tmp_path):
    argv = cmd.replace("$FIX", fix["FIX"]).replace("$OUT", str(tmp_path / "out")).split()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    expected = msg.strip("`").replace("$FIX", fix["FIX"]).replace("$OUT", str(tmp_path / "out"))
    assert err == f"autohybrid {argv[0]}: error: {expected}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))
    assert "secret" not in err and "Traceback" not in err


def test_python_dash_m_autohybrid_is_the_command():
    """``python -m autohybrid`` runs the CLI (a venv without its scripts on PATH), and a bad
    argument exits 2 with one line, as ``autohybrid`` does."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "autohybrid", "--version"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("autohybrid")
    bad = subprocess.run([sys.executable, "-m", "autohybrid", "search", "--budget", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
