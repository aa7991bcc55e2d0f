"""autohybrid pareto: the current Pareto front of any stored study, with allocation files."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("pareto", help="print a stored study's Pareto front, write allocations")
    p.add_argument("--storage", required=True, help="sqlite:///F | postgresql://... | journal:F")
    p.add_argument("--study-name", help="default: the only study in the storage")
    p.add_argument("--out", default=".", help="folder for allocations/ (default: .)")
    p.set_defaults(func=run)


def run(args) -> int:
    import optuna

    from autohybrid.exceptions import ConfigError
    from autohybrid.search.run import write_front
    from autohybrid.storage import get_storage, mask_url

    storage = get_storage(args.storage, args.out)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    name = args.study_name
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{len(names)} studies in {mask_url(args.storage)}; pick one with "
                              f"--study-name: {', '.join(names) or '(none)'}")
        name = names[0]
    if name not in names:
        raise ConfigError(f"no study {name!r} in {mask_url(args.storage)}; studies: "
                          f"{', '.join(names) or '(none)'}")
    study = optuna.load_study(study_name=name, storage=storage)
    front = write_front(study, Path(args.out), study.user_attrs.get("budget"))
    quality = study.user_attrs.get("quality", "quality")
    n = {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "RUNNING")}
    print(f"study {name}: {n['COMPLETE']} complete, {n['RUNNING']} running; "
          f"Pareto front within budget {study.user_attrs.get('budget')}:")
    print(f"{'trial':>6} {quality:>10} {'params':>8} {'MACs':>8} {'top-1':>7}  allocation")
    for t in front:
        print(f"{t.number:>6} {t.values[0]:>10.4g} {t.user_attrs['params_fraction']:>8.3f} "
              f"{t.user_attrs['macs_fraction']:>8.3f} {t.user_attrs.get('top1', 0):>7.2f}  "
              f"{args.out}/allocations/trial-{t.number:04d}.yaml")
    return 0
