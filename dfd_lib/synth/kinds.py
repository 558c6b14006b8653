"""What a family of made images is, and the two ways its images get made (the kinds).

A :class:`Family` names its kind, says whether its images are fakes or keep their source's label,
whether it takes a donor image, and what runs it. A kind is either

- an :class:`ImageKind`: one image in, one image and its JSON-able ``params`` out, per image, every
  random choice from the caller's seeded ``np.random.Generator`` (the edits, the degradations); or
- a :class:`ModelKind`: a loaded model makes the images in batches (Stable Diffusion img2img and
  inpainting; a GAN or another diffusion task is one more subclass). It says how to load its model
  for a family, how to draw one request from the rng, how to run a batch, and what each image
  records; :meth:`ModelKind.generate` isolates a failing request from the rest of its batch.

Each kind also says what an image's manipulation mask is (``mask``, see :mod:`dfd_lib.synth.masks`):
an edit's, the pixels it changed; a model's, by default the whole image.

Kinds and families are registered by name in :mod:`dfd_lib.synth.factory`.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dfd_lib.core.paths import resolve
from dfd_lib.data.manifest import CLASS_NAMES, FAKE, REAL
from dfd_lib.synth import masks

_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a family names a folder and starts every image id
FAKE_SUFFIX = "_fake"  # a label-keeping family's images made from fakes go under <name>_fake


@dataclass(frozen=True)
class Family:
    """One family of made images, declared once (see :func:`dfd_lib.synth.factory.register_family`)."""

    name: str  # the manifest's family column, the output folder and the start of each image id
    kind: str  # a registered kind: "edit", "degradation", "stable_diffusion", ...
    run: Callable[..., tuple[Image.Image, dict]] | None = None  # image kinds: (image, rng) -> (image, params)
    needs_donor: bool = False  # image kinds: run takes (image, donor, rng); the donor is a real of the same split
    task: str = ""  # model kinds: what the model does for this family ("img2img", "inpaint", ...)
    keeps_label: bool = False  # images keep their source's label (a degradation); otherwise they are fakes

    def __post_init__(self) -> None:
        reserved = [*CLASS_NAMES.values(), masks.MASKS_DIR]  # a label, or the folder of the masks
        if not _NAME.fullmatch(self.name) or self.name in reserved:
            raise ValueError(f"family name {self.name!r} must be lower-case letters, digits and '_' (not {reserved})")

    @property
    def fake_variant(self) -> str:
        """Where a label-keeping family puts images made from fakes ("" for a fake family): a name of
        their own, so that every output family has one label."""
        return f"{self.name}{FAKE_SUFFIX}" if self.keeps_label else ""

    def label_for(self, source_label: int) -> int:
        """The label of an image made from a source labelled ``source_label``."""
        return int(source_label) if self.keeps_label else FAKE

    def output_name(self, source_label: int) -> str:
        """The family an image made from a source labelled ``source_label`` is written under."""
        return self.fake_variant if self.keeps_label and int(source_label) == FAKE else self.name

    def label_of(self, output_name: str) -> int:
        """The label of every image written under ``output_name`` (this family or its fake variant)."""
        return FAKE if not self.keeps_label or output_name == self.fake_variant else REAL


@dataclass(frozen=True)
class ImageKind:
    """A kind whose images are made one at a time from one source image (and a donor)."""

    name: str

    def check_family(self, family: Family) -> None:
        if not callable(family.run) or family.task:
            raise ValueError(f"family {family.name!r} of kind {self.name!r} needs run (a callable) and no task")

    def make(self, family: Family, image: Image.Image, rng: np.random.Generator,
             donor: Image.Image | None = None) -> tuple[Image.Image, dict]:
        """One image of ``family`` from ``image``; a family that needs a donor without one gets
        ``image`` itself (a copy-move)."""
        if family.needs_donor:
            return family.run(image, donor if donor is not None else image, rng)
        return family.run(image, rng)

    def mask(self, family: Family, image: Image.Image, made: Image.Image, source: Mapping | None) -> Image.Image | None:
        """The manipulation mask of ``made``, made by ``family`` from ``image`` (``source``: its manifest row).

        A fake family's mask is the pixels it changed (the whole image if it changed the size). A
        label-keeping family (a degradation) manipulates nothing: an image made from a real has no mask;
        one made from a fake keeps the mask its source brings, if any (the fake's region is still where it
        was manipulated; the degradation's slight change everywhere is not a manipulation).
        """
        if family.keeps_label:
            return masks.source_mask(source, made.size) if int((source or {}).get("label", REAL)) == FAKE else None
        return masks.changed_pixels(image, made) if image.size == made.size else masks.whole_image(made.size)

    def cache_key(self, family: Family, config: Any, source: Mapping) -> dict:
        """Settings beyond source, donor and seed that decide an image: none, for an image kind."""
        return {}


@dataclass
class LoadedModel:
    """A model a :class:`ModelKind` loaded, with the name its images record."""

    model: Any
    name: str


class ModelKind(ABC):
    """A kind whose images a loaded model makes in batches.

    ``config`` below is the :class:`~dfd_lib.synth.config.EnrichmentConfig` of the run (the demo
    builds one too); a kind reads the settings it needs from it.
    """

    name: str = ""  # the kind's registered name
    tasks: tuple[str, ...] = ()  # the tasks its families may have

    def check_family(self, family: Family) -> None:
        if family.task not in self.tasks or family.run is not None or family.needs_donor:
            raise ValueError(f"family {family.name!r} of kind {self.name!r} needs a task in {list(self.tasks)}, "
                             "and no run or donor")

    def check_config(self, families: Sequence[Family], config: Any) -> None:
        """Raise before anything is written when ``config`` cannot serve ``families`` (a missing checkpoint)."""
        return None  # a kind without settings to check

    @abstractmethod
    def checkpoint(self, family: Family, settings: Mapping[str, Any]) -> str | None:
        """The checkpoint ``family`` loads, from the step's settings by name (a profile's raw values
        too, so that ``dfd check`` lists it); None = a built-in model, nothing to fetch."""

    def locate(self, checkpoint: str, fetch: bool = False) -> str:
        """Where ``checkpoint`` comes from here (``file:<path>``), or :class:`FileNotFoundError`."""
        path = resolve(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"{self.name} checkpoint not found: {path}")
        return f"file:{path}"

    def weights_note(self, family: Family, settings: Mapping[str, Any]) -> str:
        """What a reader of ``family``'s images must know about the model that made them, with these
        settings (e.g. that its weights are random); "" when nothing."""
        return ""

    @abstractmethod
    def load(self, family: Family, config: Any, device: Any) -> LoadedModel:
        """The model that makes ``family``'s images, ready on ``device``."""

    @abstractmethod
    def request(self, family: Family, image: Image.Image, rng: np.random.Generator, seed: int,
                source: Mapping | None) -> Any:
        """The inputs of one image, drawn from ``rng`` (``seed`` seeds the model's own generator;
        ``source`` is the source's manifest row, None in the demo)."""

    @abstractmethod
    def run_batch(self, model: Any, requests: Sequence[Any], config: Any) -> list[Image.Image]:
        """The images of ``requests``, in order, from one call of ``model``."""

    @abstractmethod
    def params(self, family: Family, request: Any, model_name: str, config: Any) -> dict:
        """What describes one made image (stored, as JSON, in its manifest row)."""

    def mask(self, family: Family, request: Any, made: Image.Image, config: Any) -> Image.Image | None:
        """The manipulation mask of ``made``, the image of ``request``: by default the whole image (a
        model that makes an image anew changed every pixel); a kind that edits a region says which."""
        return masks.whole_image(made.size)

    def cache_key(self, family: Family, config: Any, source: Mapping) -> dict:
        """Settings beyond source and seed that decide an image (a resumed run remakes an image when
        they change): by default the checkpoint."""
        return {"checkpoint": self.checkpoint(family, vars(config))}

    def generate(self, model: Any, requests: Sequence[Any], config: Any,
                 batch_size: int) -> Iterator[tuple[int, Image.Image | Exception]]:
        """``(index, image)`` for every request, ``batch_size`` per call; a call that fails is retried
        one request at a time, so a failing request yields ``(index, exception)`` and the others their images."""
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start:start + batch_size])
            try:
                images = self.run_batch(model, chunk, config)
            except Exception as exc:  # noqa: BLE001 - isolated below
                if len(chunk) == 1:
                    yield start, exc
                    continue
                images = None
            if images is not None:
                yield from enumerate(images, start)
                continue
            for offset, request in enumerate(chunk):
                try:
                    yield start + offset, self.run_batch(model, [request], config)[0]
                except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                    yield start + offset, exc


# --------------------------------------------------------------------------- source-row cells
def is_missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def text_or_none(value) -> str | None:
    """A source-row cell as text; None when it is empty or missing."""
    return None if value is None or is_missing(value) or str(value) == "" else str(value)
