"""What the search shows while it runs: the trials done, the best quality at the budget, the
ETA; on a terminal as a live rich display, in a log as a line per trial."""

from __future__ import annotations

import threading

import optuna
from optuna.trial import TrialState

from autohybrid.config import SearchConfig
from autohybrid.progress import console, interactive
from autohybrid.search.study import ORIGIN_MOVE, ORIGIN_START

__all__ = ["TrialProgress", "print_front"]


class TrialProgress:
    """``with TrialProgress(cfg) as p:`` then ``p.update(trial, study)`` after each trial
    (the Optuna loop's ``on_trial``), or ``p.refresh(study)`` from a thread that polls."""

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg
        self.live = interactive()
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> TrialProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("[bold]trials"), BarColumn(),
                              TextColumn("{task.completed}" f"/{self.cfg.trials}"),
                              TextColumn("{task.description}"), TimeRemainingColumn(),
                              console=console, transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("", total=self.cfg.trials)
        return self

    def update(self, trial, study: optuna.Study) -> None:
        self.refresh(study)

    def refresh(self, study: optuna.Study) -> None:
        with self._lock:
            trials = study.get_trials(deepcopy=False)
            feas = [t.values[0] for t in trials if t.state == TrialState.COMPLETE
                    and t.user_attrs.get("constraint", 1) <= 0]
            best = f"best {self.cfg.quality} {min(feas):.4g}" if feas else ""
            screened = sum(bool(t.user_attrs.get("screened")) for t in trials)
            over = sum(bool(t.user_attrs.get("infeasible")) for t in trials)
            failed = sum(t.state == TrialState.FAIL for t in trials)
            summary = f"{best}  screened {screened}  over budget {over}"
            if failed:
                summary += f"  failed {failed}"
            if self.live:
                self.p.update(self.task, completed=min(len(feas), self.cfg.trials),
                              description=summary)
                return
            for t in trials:  # a line per newly finished trial
                if t.state.is_finished() and t.number not in self._seen:
                    self._seen.add(t.number)
                    console.print(f"trial {t.number}: {_outcome(t, self.cfg)}; "
                                  f"{min(len(feas), self.cfg.trials)}/{self.cfg.trials} "
                                  f"within budget; {summary.strip()}", highlight=False)

    def __exit__(self, *exc) -> None:
        if self.live:
            self.p.__exit__(*exc)


def _outcome(t, cfg: SearchConfig) -> str:
    if t.user_attrs.get("infeasible"):
        return "over the budget, not evaluated"
    if t.state == TrialState.COMPLETE:
        return f"{cfg.quality} {t.values[0]:.4g}, {cfg.metric} {t.values[1]:.3f}"
    if t.user_attrs.get("screened"):
        return "screened by the surrogate"
    if t.state == TrialState.FAIL:
        return f"failed ({t.user_attrs.get('fail_reason', 'error')})"
    return t.state.name.lower()


def _short_origin(text: str) -> str:
    """A trial's origin (``search.run.origin``) in a few words: the warm start's name,
    "sampled", or "move from N"."""
    return text.split(":")[0].replace(ORIGIN_START, "").replace(ORIGIN_MOVE, "move from ")


def print_front(rows: list[dict], out=None) -> None:
    """The candidates as a table, a row a line on an 80-column console: short headers, and
    where a trial came from in short (the warm start's name, "sampled", or the trial a local
    move started from; pareto.csv has the whole origin). ``out``: a rich console (default
    stderr's)."""
    from rich.table import Table

    steps = sorted(int(k.rsplit("_", 1)[1]) for k in (rows[0] if rows else {})
                   if k.startswith("val_top1_step_"))
    speed = "latency_ratio_b1" in (rows[0] if rows else {})
    where = (f" ({rows[0].get('runtime')}, {rows[0].get('threads')} thread(s))"
             if speed else "")
    table = Table(title="Candidates (within budget), halved on the validation split",
                  caption="top-1 %: @N = validation after N fine-tune steps; test = test "
                          "split after the full fine-tune (the one returned, *); MACs count "
                          "sparse parts by nonzeros (a sparse kernel's count)"
                          + (f"; b1 = measured latency / dense at batch 1{where}"
                             if speed else ""))
    cols = ["trial", "params", "MACs", *(["b1"] if speed else []),
            *(f"@{s}" for s in steps), "test", "from"]
    for col in cols:  # numbers keep their width; where a trial came from is cut to fit
        if col == "from":
            table.add_column(col, no_wrap=True, justify="left", overflow="ellipsis",
                             max_width=18 if not speed else 12)
        else:
            table.add_column(col, no_wrap=True, justify="right", min_width=5)

    def pct(v) -> str:  # "-": not measured (pruned before that rung; only the winner tested)
        return "-" if v is None or v != v else f"{v:.2f}"

    for r in rows:
        table.add_row(
            f"{r['trial']}{'*' if r.get('returned') else ''}", f"{r['params_fraction']:.3f}",
            f"{r['macs_fraction']:.3f}",
            *([f"{r['latency_ratio_b1']:.3f}"] if speed else []),
            *(pct(r.get(f"val_top1_step_{s}")) for s in steps),
            pct(r.get("test_top1_after")), _short_origin(r.get("origin", "")),
        )
    (out or console).print(table)
