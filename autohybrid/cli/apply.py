"""autohybrid apply: model + checkpoint + allocation -> exported compressed model."""

from __future__ import annotations

from pathlib import Path

from autohybrid.cli.common import add_model_args, load_model
from autohybrid.exceptions import ConfigError


def register(sub) -> None:
    p = sub.add_parser("apply", help="compress a model by an allocation file and export it")
    add_model_args(p)
    p.add_argument("--allocation", required=True, help="allocation YAML")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + allocation)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    g = p.add_argument_group("data fit (layers with fit: data)")
    g.add_argument("--data", help="digits | cifar10:DIR | imagefolder:DIR: calibration images "
                   "from its train split; without it such layers get the weight fit")
    g.add_argument("--calib", type=int, help="calibration images (default: what the "
                   "allocation records, else 1024)")
    g.add_argument("--seed", type=int, help="calibration subset seed (default: recorded, else 0)")
    p.set_defaults(func=run)


def compress(model, size, allocation: str, input_size, data: str | None, calib: int | None,
             seed: int | None):
    """What `apply` does before exporting (shared with `finetune`): (compressed model,
    allocation, inventory, the data bundle when ``data`` is given, else None)."""
    import autohybrid as ah
    from autohybrid.apply import model_inventory

    alloc = ah.Allocation.load(allocation)
    if input_size:
        alloc.model["input_size"] = list(size)
    inv = model_inventory(model, alloc)
    calibration = bundle = None
    if data:
        from autohybrid.data import as_tensors, load_data

        recorded = alloc.meta.get("calibration") or {}
        n = calib if calib is not None else int(recorded.get("n") or 1024)
        seed = seed if seed is not None else int(recorded.get("seed") or 0)
        if n < 1:
            raise ConfigError(f"--calib {n}: give a positive number of calibration images")
        bundle = load_data(data, model, input_size=inv.input_size)
        calibration = as_tensors(bundle.calibration(n, seed=seed))[0]
        print(f"data fit on {len(calibration)} calibration images of {data} (seed {seed})")
    elif any(s.fit == "data" for s in alloc.layers.values()):
        print("note: the allocation asks for fit: data; without --data its layers get the "
              "weight fit")
    small = ah.apply(model, alloc, inv=inv, progress=True, calibration=calibration)
    if calibration is not None and alloc.meta.get("bn_recal"):
        from torch.utils.data import TensorDataset

        from autohybrid.evaluate import recalibrate_bn

        x = calibration[:256]
        recalibrate_bn(small, TensorDataset(x, x.new_zeros(len(x))), batches=None,
                       progress=False)
        print("BatchNorm statistics re-estimated on the calibration images, as the search chose")
    errors = small.autohybrid_errors
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    kind = "output" if calibration is not None else "weight"
    print(f"compressed {len(errors)} layers (worst relative {kind} error {worst[1]:.3f} at "
          f"{worst[0]})")
    return small, alloc, inv, bundle


def run(args) -> int:
    import autohybrid as ah

    model, size = load_model(args)
    small, alloc, inv, _ = compress(model, size, args.allocation, args.input_size, args.data,
                                    args.calib, args.seed)
    out = ah.export(small, alloc, args.out)
    if args.onnx:
        ah.export_onnx(small, Path(out) / "model.onnx", inv.input_size, alloc=alloc, inv=inv)
    print(f"counted: {alloc.cost(inv)}")
    print(f"wrote {out}/")
    return 0
