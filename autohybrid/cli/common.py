"""Options shared by subcommands, converted to library objects once, here."""

from __future__ import annotations

import argparse

import yaml

from autohybrid.exceptions import ConfigError


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="timm model name, e.g. cifar_resnet20")
    g.add_argument("--checkpoint", help="weights: .pth/.th state dict or .safetensors")
    g.add_argument("--num-classes", type=int, help="classifier size (default: from checkpoint)")
    g.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="extra timm.create_model argument, repeatable (e.g. img_size=32)",
    )
    g.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
        help="input size (default: the model's data config)",
    )


def model_kwargs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {pair!r} is not KEY=VALUE (e.g. img_size=32)")
        out[key] = yaml.safe_load(value)
    return out


def load_model(args: argparse.Namespace):
    """(model in eval mode, input size) from the model options."""
    from autohybrid.inventory import model_input_size
    from autohybrid.models import create_model

    model = create_model(
        args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
        **model_kwargs(args.model_arg),
    ).eval()
    size = tuple(args.input_size) if args.input_size else model_input_size(model)
    return model, size
