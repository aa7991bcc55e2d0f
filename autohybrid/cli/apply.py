"""autohybrid apply: model + checkpoint + allocation -> exported compressed model."""

from __future__ import annotations

from pathlib import Path

from autohybrid.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("apply", help="compress a model by an allocation file and export it")
    add_model_args(p)
    p.add_argument("--allocation", required=True, help="allocation YAML")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + allocation)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.set_defaults(func=run)


def run(args) -> int:
    import autohybrid as ah
    from autohybrid.apply import model_inventory

    model, size = load_model(args)
    alloc = ah.Allocation.load(args.allocation)
    if args.input_size:
        alloc.model["input_size"] = list(size)
    inv = model_inventory(model, alloc)
    small = ah.apply(model, alloc, inv=inv, progress=True)
    out = ah.export(small, alloc, args.out)
    if args.onnx:
        ah.export_onnx(small, Path(out) / "model.onnx", inv.input_size)
    errors = small.autohybrid_errors
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    print(f"compressed {len(errors)} layers (worst relative error {worst[1]:.3f} at {worst[0]})")
    print(f"counted: {alloc.cost(inv)}")
    print(f"wrote {out}/")
    return 0
