"""Options shared by subcommands, converted to library objects once, here."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

from autohybrid.exceptions import ConfigError


def add_model_args(
    p: argparse.ArgumentParser, required: bool = True, weights: bool = True
) -> None:
    """The model options; ``weights``: the subcommand's result depends on the weights, so a
    --model without --checkpoint is refused unless --random-init says so."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="timm model name, e.g. cifar_resnet20")
    g.add_argument("--checkpoint", help="weights: .pth/.th state dict or .safetensors")
    if weights:
        g.add_argument("--random-init", action="store_true",
                       help="use randomly initialised weights when no --checkpoint is given")
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

    check_weights(args.model, args.checkpoint, getattr(args, "random_init", True))
    model = create_model(
        args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
        **model_kwargs(args.model_arg),
    ).eval()
    size = tuple(args.input_size) if args.input_size else model_input_size(model)
    return model, size


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | cifar10:DIR | imagefolder:DIR")
    g.add_argument("--calib", type=int, default=1024, help="calibration images (train split)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--bn-recal", default="auto", help="auto | on | off (BatchNorm recalibration)")
    g.add_argument("--recal-images", type=int, default=256)


def parse_bn_recal(value: str):
    v = str(value).lower()
    if v not in ("auto", "on", "off", "true", "false"):
        raise ConfigError(f"--bn-recal {value!r}: use auto, on or off")
    return "auto" if v == "auto" else v in ("on", "true")


def calibration_tensors(args: argparse.Namespace, model, size):
    """The calibration subset of the train split as tensors (drawn with --seed)."""
    from autohybrid.data import as_tensors, load_data

    data = load_data(args.data, model, input_size=size)
    return as_tensors(data.calibration(args.calib, seed=args.seed))


def check_weights(model: str | None, checkpoint: str | None, random_init: bool) -> None:
    """A --model without --checkpoint would run on random weights: refuse unless asked for."""
    if model and not checkpoint and not random_init:
        raise ConfigError(
            f"--model {model} has no --checkpoint, so its weights would be random; give "
            "--checkpoint FILE (the trained weights), or --random-init if random weights are "
            "what you want"
        )


def check_out(out: str | os.PathLike, kind: str = "folder") -> None:
    """Refuse an --out that cannot be created or written, before any work is done.

    ``kind`` is ``folder`` (the output directory) or ``file``. Nothing is left behind: the
    probe is a temporary folder in the deepest existing directory, removed at once.
    """
    path = Path(out).expanduser().absolute()
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder; give a folder to write to")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file name to write to")
    base = path if kind == "folder" else path.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {base} is a file, not a folder; "
                          "choose another location")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autohybrid-probe-", dir=base))
    except OSError:
        raise ConfigError(f"--out {out} cannot be created or written: no files can be made in "
                          f"{base}; choose a folder you can write to") from None


def check_out_args(args: argparse.Namespace) -> None:
    """``check_out`` on a subcommand's --out, if it has one (``out_kind`` set by the parser)."""
    out = getattr(args, "out", None)
    if out is not None:
        check_out(out, getattr(args, "out_kind", "folder"))
