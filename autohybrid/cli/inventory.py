"""autohybrid inventory: list a model's layers, their cost and the methods that apply."""

from __future__ import annotations

import json

from autohybrid.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("inventory", help="list compressible layers, params, MACs, methods")
    add_model_args(p, weights=False)  # structure only
    p.add_argument("--exclude", action="append", help="layer name pattern to leave dense")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from autohybrid.inventory import inventory
    from autohybrid.methods import applicable_methods

    model, size = load_model(args)
    inv = inventory(model, size, exclude=args.exclude)
    if args.json:
        doc = {
            "model": inv.model_name, "input_size": inv.input_size,
            "fingerprint": inv.fingerprint, "total_params": inv.total_params,
            "total_macs": inv.total_macs,
            "layers": [
                {**layer.structure(), "params": layer.params, "macs": layer.macs,
                 "excluded": layer.excluded, "methods": list(applicable_methods(layer))}
                for layer in inv
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(inv.table(applicable_methods))
    return 0
