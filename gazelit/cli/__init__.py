"""The `gazelit` command: one subcommand per module in this package.

Each command module defines `register(subparsers)` which adds its parser and sets `func=run` on it;
`run(args) -> int` is the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command modules, in the order `gazelit --help` lists them
COMMANDS = [
    "gazelit.cli.convert_cmd",
    "gazelit.cli.index_cmd",
    "gazelit.cli.cost_cmd",
    "gazelit.cli.eval_cmd",
    "gazelit.cli.generate_cmd",
    "gazelit.cli.analyze_cmd",
    "gazelit.cli.fit_cmd",
    "gazelit.cli.validate_cmd",
    "gazelit.cli.export_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gazelit", description="Train, run and analyse multimodal LLMs with Gaze Attention."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
