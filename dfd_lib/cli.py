"""The ``dfd`` command. Each subcommand lives in the stage it drives: the module named here
defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its
subcommand runs, so ``dfd --help`` stays fast. Messages go through :mod:`dfd_lib.core.logs`."""
from __future__ import annotations

import argparse
import importlib
import sys

from dfd_lib.core.commands import run_command

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-demo": ("dfd_lib.sources.demo", "build the embedded demo dataset offline (data/demo/)"),
    "manifest": ("dfd_lib.data.readers", "scan a dataset (competition CSV or real/ fake/ folders) into a manifest"),
    "check": ("dfd_lib.pipeline.preflight", "check a profile before running it: data, weights, disk, device, memory"),
    "fetch-weights": ("dfd_lib.pipeline.fetch", "download the backbones and Stable Diffusion checkpoints a profile needs"),
    "pipeline": ("dfd_lib.pipeline.cli", "run the numbered notebooks headless with papermill"),
    "status": ("dfd_lib.pipeline.status_cli", "which steps of a run are up to date, stale (and why) or not run"),
    "rerun": ("dfd_lib.pipeline.rerun", "execute a run folder again from what it recorded (profile, overrides, data)"),
    "compare": ("dfd_lib.pipeline.compare", "say whether two run folders agree, file by file and metric by metric"),
    "embed": ("dfd_lib.steps.features", "read a dataset into a run folder and embed it (notebook 01's manifest.csv and embeddings)"),
    "cluster": ("dfd_lib.steps.clustering", "cluster a run's embeddings into leave-one-cluster-out re-splits (notebook 02's resplits.csv)"),
    "augment": ("dfd_lib.synth.cli", "generate notebook 03's edited / Stable Diffusion images into a run folder"),
    "train": ("dfd_lib.training.cli", "train an expert, or one per re-split and their mixture, from a config file"),
    "predict": ("dfd_lib.scoring.cli", "score images, folders or globs into a CSV"),
    "calibrate": ("dfd_lib.scoring.calibrate_cli", "choose the verdict threshold on labelled images (a target FPR or the EER)"),
    "convert-weights": ("dfd_lib.models.released", "convert the released weight.pth + ema.state into our format"),
    "serve": ("dfd_lib.serving.cli", "serve the HTTP API and the web page"),
    "export": ("dfd_lib.scoring.export_cli", "convert a mixture for OpenVINO or ONNX Runtime (cached, exact; int8 as an option)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfd", description="dfd-kit: deepfake detection, reproducibly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, text) in COMMANDS.items():
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
    return run_command(importlib.import_module(module_name), name, rest, description=text)


if __name__ == "__main__":
    sys.exit(main())
