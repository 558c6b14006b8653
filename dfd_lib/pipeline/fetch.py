"""``dfd fetch-weights``: download every backbone and Stable Diffusion checkpoint a profile needs into
the Hugging Face cache (``HF_HOME``), so a machine with internet prepares what compute nodes without
it then read offline (``HF_HUB_OFFLINE=1``). Offline it says what it would fetch and fails."""
from __future__ import annotations

import argparse
import logging

from huggingface_hub import constants

from dfd_lib.models.backbones import hf_home
from dfd_lib.pipeline import needs
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides
from dfd_lib.pipeline.profiles import step_values
from dfd_lib.pipeline.steps import PipelineError

log = logging.getLogger(__name__)


def fetch_weights(profile: str, overrides: dict | None = None) -> list[tuple[str, needs.Resolved]]:
    """``(what, resolved)`` for every weight the profile needs, fetched into the cache where needed."""
    values = step_values(profile, overrides)
    done = [(f"{b.step} backbone {b.name}", needs.resolve_backbone(b, fetch=True)) for b in needs.backbones(values)]
    done += [(f"03 Stable Diffusion ({c.task}) {c.checkpoint}", needs.resolve_diffusion(c, fetch=True))
             for c in needs.diffusion_checkpoints(values)]
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="pipelines/<profile>.yaml (or a .yaml path)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="the same overrides as dfd pipeline (e.g. -p 04.backbones='[...]')")


def run(args: argparse.Namespace) -> int:
    try:
        done = fetch_weights(args.profile, parse_overrides(args.param))
    except (PipelineError, ParameterError) as exc:
        log.error("dfd fetch-weights: %s", exc)
        return 2
    for what, resolved in done:
        print(f"{'ok' if resolved.ok else 'MISSING'}: {what}: {resolved.source}")
    missing = [what for what, resolved in done if not resolved.ok]
    if missing and constants.HF_HUB_OFFLINE:
        print(f"HF_HUB_OFFLINE is set: nothing was downloaded. Online, this command would fetch {len(missing)} "
              f"item(s) into {hf_home()}")
    print(f"{len(done) - len(missing)} of {len(done)} ready in {hf_home()}")
    return 1 if missing else 0
