"""The ``hdkd`` command: ``hdkd <command> ...`` (``[project.scripts]`` in pyproject.toml).

A command is a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> exit
status``; it is registered by one entry in :data:`COMMANDS`. An error that stops a command (``OSError``,
``ValueError``, ``RuntimeError``) is printed as one line, with exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from hdkd.use import explain, predict, serve

COMMANDS = {"predict": predict, "explain": explain, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdkd", description="Use the trained HDKD models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"hdkd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
