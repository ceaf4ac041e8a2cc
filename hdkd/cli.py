"""The ``hdkd`` command: one subcommand per use of a trained model.

A subcommand is one line of :data:`COMMANDS`: its name -> ``(add_arguments(parser), run(args))``;
``add_arguments``'s docstring is the subcommand's one-line help.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from hdkd import explain

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]] = {
    "explain": (explain.add_arguments, explain.run),
}


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="hdkd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=add_arguments.__doc__))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
