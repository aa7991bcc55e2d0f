"""Off a terminal (CI, nohup, a cluster log) a loop writes a few lines, not one per step."""

from __future__ import annotations

import io

from autohybrid import progress


def test_a_logged_loop_writes_a_line_per_few_percent(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    buf = io.StringIO()
    bar = progress.bar(range(400), desc="finetune", file=buf)
    for i in bar:
        bar.set_postfix(loss=i)  # tqdm redraws on each of these by default
    bar.close()
    lines = [s for s in buf.getvalue().replace("\r", "\n").split("\n") if s.strip()]
    assert 5 <= len(lines) <= 1 / progress.LOG_EVERY + 3, len(lines)


def test_progress_false_writes_nothing():
    buf = io.StringIO()
    for _ in progress.bar(range(10), file=buf, progress=False):
        pass
    assert buf.getvalue() == ""
