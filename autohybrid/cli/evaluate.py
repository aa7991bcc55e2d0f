"""autohybrid evaluate: top-1 and loss of a dense or exported compressed model on a split."""

from __future__ import annotations

import json

from autohybrid.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1 / loss of a dense model or an exported one")
    add_model_args(p, required=False)
    p.add_argument("--exported", help="folder written by `autohybrid apply` / `search`")
    p.add_argument("--data", required=True, help="digits | cifar10:DIR | imagefolder:DIR")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--limit", type=int, help="evaluate the first N samples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from autohybrid.data import load_data
    from autohybrid.evaluate import evaluate
    from autohybrid.exceptions import ConfigError
    from autohybrid.export import load

    if bool(args.exported) == bool(args.model):
        raise ConfigError("give either --model (dense) or --exported DIR (compressed)")
    if args.exported:
        model = load(args.exported)
        size = args.input_size or model.pretrained_cfg.get("input_size")
    else:
        model, size = load_model(args)
    data = load_data(args.data, model, input_size=size)
    split = data.test if args.split == "test" else data.train
    if args.limit:
        split = torch.utils.data.Subset(split, range(min(args.limit, len(split))))
    result = evaluate(model, split, batch_size=args.batch_size, progress=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.split}: top-1 {result['top1']:.2f} %  loss {result['loss']:.4f}  "
              f"({result['n']} samples)")
    return 0
