"""Demo weights: a mixture the pipeline trained on the kit's built-in demo dataset, whose fakes are
made by dfd-kit's own generators. Such a mixture scores images like any other, so wherever it is
served or scored (``dfd predict``, ``dfd serve`` and its page, notebook 05's widget) it says so,
from the provenance in its ``config.json`` (:class:`dfd_lib.models.checkpoints.MixtureConfig`)."""
from __future__ import annotations

from dfd_lib.models.checkpoints import MixtureConfig

TRAINED_ON = "trained_on"  # provenance key: the datasets a mixture was trained on
DEMO_WEIGHTS = "demo_weights"  # provenance key: "true" when they are the built-in demo
DEMO_TRAINED_ON = "demo (dfd-kit's own synthetic fakes)"
DEMO_MARKER = "demo weights"  # appended to the threshold source of every verdict of demo weights
DEMO_NOTICE = ("demo weights: trained on dfd-kit's own synthetic fakes (the demo dataset), not a deepfake detector "
               "— train on your own data (`dfd pipeline --profile full -p dataset=...`) or convert the released "
               "weights (`dfd convert-weights SRC DST`) for real use")


def demo_provenance() -> dict[str, str]:
    """What a mixture trained on the built-in demo records in its provenance."""
    return {TRAINED_ON: DEMO_TRAINED_ON, DEMO_WEIGHTS: "true"}


def is_demo(config: MixtureConfig) -> bool:
    return config.provenance.get(DEMO_WEIGHTS, "").strip().lower() == "true"


def demo_notice(config: MixtureConfig) -> str | None:
    """The plain notice for demo weights, None for any other mixture."""
    return DEMO_NOTICE if is_demo(config) else None
