"""autohybrid search: the whole pipeline under a budget. No --model: the built-in demo."""

from __future__ import annotations

from autohybrid.cli.common import model_kwargs
from autohybrid.config import SearchConfig


def register(sub) -> None:
    p = sub.add_parser("search", help="search per-layer allocations under a budget (the demo "
                       "runs when no --model is given)")
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--budget", help="fraction of the dense model to keep, e.g. 0.2")
    p.add_argument("--metric", help="params (default), flops, or latency (measured per "
                   "layer on --runtime, at --threads and --latency-batch)")
    p.add_argument("--runtime", help="latency's target: torch (default, eager on CPU) | "
                   "onnxruntime")
    p.add_argument("--latency-batch", type=int, help="batch size the latency budget is "
                   "measured at (default 1)")
    p.add_argument("--threads", type=int, help="threads the latency is measured with "
                   "(default: torch's current setting)")
    p.add_argument("--latency-margin", type=float, help="share of a latency budget the "
                   "search keeps in reserve, so the returned model measures within it "
                   "(default 0.03: a whole-model measurement moves by a few percent)")
    p.add_argument("--model", help="timm model name (default: the built-in demo)")
    p.add_argument("--checkpoint")
    p.add_argument("--random-init", action="store_true",
                   help="search a --model without --checkpoint (random weights)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--data", help="digits | cifar10:DIR | imagefolder:DIR")
    p.add_argument("--search-space", help="search space YAML (default: by model family)")
    p.add_argument("--out", help="output folder (default ./autohybrid-out)")
    p.add_argument("--storage", help="sqlite:///F | postgresql://... | journal:FILE")
    p.add_argument("--study-name")
    p.add_argument("--sampler", help="nsga2 (default) | tpe | gp")
    p.add_argument("--backend", help="optuna (default) | ray")
    p.add_argument("--ray-address", help="existing Ray cluster (default: local Ray)")
    p.add_argument("--concurrency", type=int, help="parallel trials with --backend ray")
    p.add_argument("--resume", action="store_true", help="resume an interrupted Ray experiment")
    p.add_argument("--trials", type=int,
                   help="evaluated trials within the budget to reach, on either backend "
                        "(default 40)")
    p.add_argument("--population", type=int, help="NSGA-II population size")
    p.add_argument("--seed", type=int)
    p.add_argument("--calib", type=int, help="calibration images from the train split")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--bn-recal", help="auto | on | off")
    p.add_argument("--quality", help="kl (default) | loss | disagreement")
    p.add_argument("--fit", help="data (default: fit each layer to its outputs on the "
                   "calibration images) | weights (truncate / prune the weights only)")
    p.add_argument("--damp", type=float,
                   help="data-fit damping, relative to mean(diag H) (default 0.01)")
    p.add_argument("--saliency", help="sparse mask saliency of the data fit: obs (default) | "
                   "wanda")
    p.add_argument("--max-groups", type=int, help="cluster layers into at most this many")
    p.add_argument("--no-screen", action="store_true", help="evaluate every trial")
    p.add_argument("--no-speed", action="store_true", help="do not time the results (their "
                   "latency columns); a latency budget still measures its table")
    p.add_argument("--local-search", type=float, metavar="SHARE",
                   help="share of --trials spent on one-layer moves around the best trial "
                   "(default 0.3; 0 turns it off)")
    p.add_argument("--val", type=int, help="validation images held out from the training "
                   "split; the candidates are chosen on them (default 1000, or a fifth of a "
                   "smaller training split)")
    p.add_argument("--candidates", type=int, help="trials fine-tuned by successive halving "
                   "(default 6: the best near the budget, one per method family, the warm "
                   "starts)")
    p.add_argument("--eta", type=int, help="halving factor: each rung keeps the top 1/eta "
                   "for eta times more fine-tune steps (default 3)")
    p.add_argument("--finetune-budget", type=int, metavar="STEPS",
                   help="fine-tune steps of the whole halving ladder (default 800); the "
                   "winner gets the longest full fine-tune that fits. 0: no fine-tune, the "
                   "candidate with the best validation top-1 as fitted is returned")
    p.add_argument("--finetune-epochs", type=float,
                   help="the winner's full fine-tune in epochs (instead of --finetune-budget)")
    p.add_argument("--finetune-steps", type=int,
                   help="the winner's full fine-tune in steps (instead of --finetune-budget)")
    p.add_argument("--finetune-lr", type=float)
    p.add_argument("--device", help="fine-tunes and validation: auto (default: a GPU when "
                   "present) | cpu | cuda")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test samples")
    p.set_defaults(func=run)


FLAGS = ("budget", "metric", "runtime", "latency_batch", "threads", "latency_margin", "model",
         "checkpoint", "num_classes", "input_size", "data",
         "search_space", "out", "storage", "study_name", "sampler", "backend", "ray_address",
         "concurrency", "trials", "population", "seed", "calib", "batch_size", "bn_recal",
         "quality", "fit", "damp", "saliency", "max_groups", "local_search", "val",
         "candidates", "eta", "finetune_budget", "finetune_epochs", "finetune_steps",
         "finetune_lr", "device", "test_limit")


def resolve(args) -> SearchConfig:
    """Defaults < the demo's settings (when no model is given) < --config file < flags."""
    from autohybrid.exceptions import BudgetError

    base = SearchConfig.read(args.config) if args.config else {}
    for key in FLAGS:
        v = getattr(args, key, None)
        if v is not None:
            base[key] = list(v) if key == "input_size" else v
    if "budget" in base and isinstance(base["budget"], str):
        try:
            base["budget"] = float(base["budget"])
        except ValueError:
            raise BudgetError(f"budget {base['budget']!r} is not a number; give a fraction "
                              "such as 0.2") from None
    if args.model_arg:
        base["model_args"] = model_kwargs(args.model_arg)
    if args.no_screen:
        base["screen"] = False
    if getattr(args, "no_speed", False):
        base["speed"] = False
    if args.resume:
        base["resume"] = True
    cfg = SearchConfig.from_dict(base, "options")  # bad settings fail before any work
    if cfg.model is None:
        from autohybrid.config import DEMO_MODEL
        from autohybrid.demo import demo_settings
        from autohybrid.progress import console

        console.print(f"[bold]demo[/]: {DEMO_MODEL} trained on scikit-learn digits "
                      "(no --model given)")
        given = {k: v for k, v in base.items() if v is not None}
        demo = demo_settings()
        if "finetune_steps" in given or "finetune_epochs" in given:
            demo.pop("finetune_budget", None)  # the user's fine-tune length sets the ladder
        cfg = SearchConfig.from_dict({**demo, **given}, "options")
    cfg.validate()
    return cfg


def run(args) -> int:
    from autohybrid.cli.common import check_out, check_weights
    from autohybrid.search.run import run_search

    cfg = resolve(args)
    check_weights(cfg.model, cfg.checkpoint, args.random_init)
    if args.out is None:  # from --config or the default; a flag was checked already
        check_out(cfg.out)
    run_search(cfg)
    return 0
