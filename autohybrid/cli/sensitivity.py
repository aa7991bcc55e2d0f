"""autohybrid sensitivity: per-layer x per-candidate sensitivity table, plots, cached."""

from __future__ import annotations

from autohybrid.cli.common import add_data_args, add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="score every candidate on every layer (cached)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--search-space", help="search space YAML (default: by model family)")
    p.add_argument("--layers", nargs="*", help="only these layer names")
    p.add_argument("--naive", action="store_true", help="full forward per candidate (slow)")
    p.add_argument("--signal", default="kl", help="what the plots show (kl, dloss, dtop1)")
    p.add_argument("--fit", default="data", choices=("data", "weights"),
                   help="fit each candidate to the layer's outputs on the calibration images "
                   "(data, default) or to its weights")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from autohybrid.cli.common import calibration_tensors, parse_bn_recal
    from autohybrid.inventory import inventory
    from autohybrid.report import write_sensitivity_report
    from autohybrid.search_space import load_search_space
    from autohybrid.sensitivity import sensitivity

    model, size = load_model(args)
    space = load_search_space(args.model, args.search_space)
    x, y = calibration_tensors(args, model, size)
    inv = inventory(model, size)
    stats = None
    if args.fit == "data":
        from autohybrid.stats import input_stats

        stats = input_stats(model, inv, [la.name for la in space.compressible(inv)], x,
                            out_dir=args.out, key_extra={"data": args.data, "seed": args.seed})
    table = sensitivity(
        model, inv, space, x, y, out_dir=args.out,
        key_extra={"data": args.data, "seed": args.seed}, batch_size=args.batch_size,
        bn_recal=parse_bn_recal(args.bn_recal), recal_images=args.recal_images,
        naive=args.naive, layers=args.layers, progress=True, stats=stats,
    )
    write_sensitivity_report(table, args.out, args.signal)
    meta = table.meta
    how = "served from cache" if meta.get("cached") else f"computed in {meta['seconds']:.1f} s"
    if not meta.get("cached") and meta.get("resumed_layers"):
        how += f" ({len(meta['resumed_layers'])} layers kept from an interrupted run)"
    print(f"{len(table.df)} rows for {table.df.layer.nunique()} layers, {how}; "
          f"BN recalibration {'on' if meta['bn_recal'] else 'off'}"
          + (f" (dense-only recalibration moves KL by {meta['bn_recal_check']['kl']:.4f})"
             if meta.get("bn_recal_check") else ""))
    print(f"wrote {args.out}/sensitivity.csv, sensitivity.html and plots")
    return 0
