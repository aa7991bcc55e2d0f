"""Entry point: parse, call the library, turn AutohybridError into one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from autohybrid.cli import (
    allocate,
    apply,
    evaluate,
    finetune,
    inventory,
    pareto,
    search,
    sensitivity,
)
from autohybrid.cli.common import check_out_args
from autohybrid.exceptions import AutohybridError

SUBCOMMANDS = [search, pareto, inventory, sensitivity, allocate, apply, finetune, evaluate]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from autohybrid import __version__

    parser = _Parser(prog="autohybrid", description=__doc__)
    parser.add_argument("--version", action="version", version=f"autohybrid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_out_args(args)  # an --out that cannot be written fails before any work
        return args.func(args) or 0
    except AutohybridError as e:
        print(f"autohybrid {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autohybrid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
