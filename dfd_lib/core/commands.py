"""How a ``dfd`` subcommand runs: a command module defines ``add_arguments(parser)`` and
``run(args) -> int``; :func:`run_command` builds its parser, shows the library's messages and runs it.
The ``dfd`` command (:mod:`dfd_lib.cli`) dispatches to it by name, and a module started on its own
(``python -m dfd_lib.training.cli``, ``accelerate launch -m ...``) calls it directly."""
from __future__ import annotations

import argparse
import types

from dfd_lib.core.logs import setup_logging


def run_command(module: types.ModuleType, name: str, argv: list[str], description: str = "") -> int:
    """Run the command module ``module`` as ``dfd <name>`` with the arguments ``argv``; its exit status."""
    setup_logging()
    text = description or (module.__doc__ or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=f"dfd {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)
