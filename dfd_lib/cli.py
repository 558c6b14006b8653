"""The ``dfd`` command. Each subcommand lives beside the code it drives: the module named
here defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
its subcommand runs, so ``dfd --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-demo": ("dfd_lib.demo_data", "build the embedded demo dataset offline (data/demo/)"),
    "manifest": ("dfd_lib.manifest", "scan a dataset (competition CSV or real/ fake/ folders) into a manifest"),
    "augment": ("dfd_lib.augment", "generate edited / Stable Diffusion images into a run folder"),
    "pipeline": ("dfd_lib.pipeline", "run the numbered notebooks headless with papermill"),
    "predict": ("dfd_lib.predict_cli", "score images, folders or globs into a CSV"),
    "convert-weights": ("dfd_lib.checkpoint", "convert the released weight.pth + ema.state into our format"),
    "serve": ("dfd_lib.serve", "serve the HTTP API and the web page"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfd", description="dfd-kit: deepfake detection, reproducibly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        sub.add_parser(name, help=text, description=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"dfd: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dfd {name}", description=text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
