"""autohybrid allocate: write a uniform allocation file at a budget."""

from __future__ import annotations

from autohybrid.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("allocate", help="write a uniform allocation (one level for all layers)")
    add_model_args(p, weights=False)  # structure only
    p.add_argument(
        "--method", default="lowrank+sparse",
        help="lowrank+sparse (default) | lowrank | sparse | svd | tucker2 | cp | tt",
    )
    p.add_argument("--budget", type=float, required=True, help="fraction of the dense model")
    p.add_argument("--metric", default="params", help="params (default) or flops")
    p.add_argument("--sparse-share", type=float, default=0.5,
                   help="share of each layer's budget for the sparse part (lowrank+sparse)")
    p.add_argument("--out", required=True, help="allocation YAML to write")
    p.set_defaults(func=run, out_kind="file")


def run(args) -> int:
    from autohybrid.allocation import Allocation
    from autohybrid.inventory import inventory

    model, size = load_model(args)
    inv = inventory(model, size)
    alloc = Allocation.uniform(
        inv, method=args.method, budget=args.budget, metric=args.metric,
        sparse_share=args.sparse_share,
    )
    alloc.save(args.out)
    print(f"wrote {args.out}: {len(alloc.layers)} layers, {alloc.cost(inv)}")
    return 0
