"""Manifest rows as model inputs, for training and evaluation alike.

The evaluation transform is :class:`dfd_lib.data.preprocess.InputTransform`, the one ``dfd predict``
uses, after decoding with :func:`dfd_lib.data.images.load_rgb`; so a validation AUC measured here is
the AUC ``dfd predict`` gives.
Training adds light augmentation (a random resized crop and a horizontal flip) drawn from a
generator seeded by ``(seed, epoch, index)``: the same sample gets the same augmentation in
any worker, any process and after a resume.

Unreadable images never stop a run: the sample comes back as an error record, the collate
function drops it and lists it in the batch's ``skipped`` entry for the caller to report.

With ``masks=True`` (the ``mask`` loss term) each sample also carries its manipulation mask (the
manifest's ``mask`` column) as ``(1, S, S)`` in [0, 1], through exactly the image's geometric
transform (the same crop, resize and flip; nothing photometric), and ``has_mask``. A row without a
mask gets zeros and ``has_mask`` False; so does a row whose mask cannot be read or is not its image's
size, reported in the batch's ``mask_skipped`` entry rather than stopping the run.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import RandomResizedCrop

from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.data.manifest import MASK
from dfd_lib.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputTransform


@dataclass
class TrainAugmentConfig:
    """Training-time augmentation; ``crop_scale=(1, 1)`` and ``hflip=False`` switch it off."""

    hflip: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop

    def __post_init__(self):
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"TrainAugmentConfig.crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"TrainAugmentConfig.crop_ratio must be (lo, hi) with 0 < lo <= hi, got {self.crop_ratio}")

    @property
    def crops(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)


AUGMENT_STREAM, ORDER_STREAM = 0, 1


def sample_seed(seed: int, epoch: int, index: int, stream: int = AUGMENT_STREAM) -> int:
    """A seed that differs across runs, epochs, samples and uses (``stream``)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(stream)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class ManifestDataset(Dataset):
    """Rows of a manifest table (columns ``path`` and ``label``) as ``(3, S, S)`` tensors.

    ``__getitem__`` returns ``{"image", "label", "index"}`` or, for an unreadable file,
    ``{"index", "path", "error"}``; use :func:`collate_skipping_unreadable` as collate_fn.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        image_size: int,
        train: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: TrainAugmentConfig | None = None,
        interpolation: str = "bilinear",
        antialias: bool = True,
        seed: int = 0,
        masks: bool = False,
    ):
        missing = [c for c in ("path", "label") if c not in table.columns]
        if missing:
            raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
        self.paths = [str(p) for p in table["path"]]
        self.labels = table["label"].astype(int).to_numpy()
        self.transform = InputTransform(image_size, mean, std, interpolation, antialias)
        self.train = train
        self.augment = (augment or TrainAugmentConfig()) if train else None
        self.seed = int(seed)
        self.epoch = 0
        self.masks = bool(masks)
        self.mask_paths = [_mask_path(v) for v in table[MASK]] if MASK in table.columns else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def to_tensor(self, rgb: np.ndarray, generator_seed: int | None = None) -> torch.Tensor:
        """HxWx3 uint8 -> normalised ``(3, S, S)``; with ``generator_seed``, augmented."""
        x = self.transform.normalise(rgb)
        return self._geometric(x, self._draw(x, generator_seed))

    def mask_tensor(self, mask: np.ndarray, generator_seed: int | None = None) -> torch.Tensor:
        """HxW uint8 mask (its image's size; > 0 = changed) -> ``(1, S, S)`` in [0, 1], through the same crop,
        resize and flip as :meth:`to_tensor` gives its image for ``generator_seed``."""
        m = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None]
        return self._geometric(m, self._draw(m, generator_seed)).clamp_(0.0, 1.0)

    def _draw(self, x: torch.Tensor, generator_seed: int | None) -> tuple[tuple[int, int, int, int] | None, bool]:
        """The crop box (None: the whole image) and the flip for ``generator_seed``, from ``x``'s height and width."""
        box, flip = None, False
        if generator_seed is not None and self.augment is not None:
            # torchvision draws crop parameters from the global RNG: fork it, seed it per sample
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(generator_seed)
                if self.augment.crops:
                    box = tuple(RandomResizedCrop.get_params(x, list(self.augment.crop_scale), list(self.augment.crop_ratio)))
                flip = self.augment.hflip and bool(torch.rand(()) < 0.5)
        return box, flip

    def _geometric(self, x: torch.Tensor, drawn: tuple[tuple[int, int, int, int] | None, bool]) -> torch.Tensor:
        box, flip = drawn
        if box is not None:
            top, left, height, width = box
            x = x[:, top : top + height, left : left + width]
        x = self.transform.resize(x)
        return x.flip(-1) if flip else x

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            rgb = np.array(load_rgb(path))  # writable: torch.from_numpy warns on read-only arrays
        except (ImageLoadError, OSError) as exc:
            return {"index": index, "path": path, "error": getattr(exc, "reason", str(exc))}
        seed = sample_seed(self.seed, self.epoch, index) if self.train else None
        item = {"image": self.to_tensor(rgb, seed), "label": int(self.labels[index]), "index": index}
        if self.masks:
            item.update(self._mask_item(index, rgb.shape[:2], seed))
        return item

    def _mask_item(self, index: int, image_shape: tuple[int, int], seed: int | None) -> dict:
        """``mask`` and ``has_mask`` of row ``index`` (zeros and False without a usable mask, with ``mask_error``)."""
        side = self.transform.image_size
        empty = {"mask": torch.zeros(1, side, side), "has_mask": False}
        mask_path = self.mask_paths[index]
        if mask_path is None:
            return empty
        try:
            mask = np.array(load_rgb(mask_path))[..., 0]  # a mask is grey: any channel
        except (ImageLoadError, OSError) as exc:
            return {**empty, "mask_error": (mask_path, getattr(exc, "reason", str(exc)))}
        if mask.shape != tuple(image_shape):
            return {**empty, "mask_error": (mask_path, f"{mask.shape[1]}x{mask.shape[0]}, its image is "
                                                       f"{image_shape[1]}x{image_shape[0]}")}
        return {"mask": self.mask_tensor(mask, seed), "has_mask": True}


def _mask_path(value) -> str | None:
    """A ``mask`` cell as a path, None when empty."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value) == "":
        return None
    return str(value)


def collate_skipping_unreadable(items: list[dict]) -> dict:
    """Stack the readable samples; ``skipped`` lists ``(path, reason)`` of the others."""
    good = [item for item in items if "error" not in item]
    skipped = [(item["path"], item["error"]) for item in items if "error" in item]
    if not good:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                "index": torch.empty(0, dtype=torch.long), "skipped": skipped}
    batch = {
        "image": torch.stack([item["image"] for item in good]),
        "label": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": skipped,
    }
    if "mask" in good[0]:  # a dataset with masks=True
        batch["mask"] = torch.stack([item["mask"] for item in good])
        batch["has_mask"] = torch.tensor([item["has_mask"] for item in good], dtype=torch.bool)
        batch["mask_skipped"] = [item["mask_error"] for item in good if "mask_error" in item]
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``: the data order of an epoch
    is the same in an uninterrupted run and in a resumed one."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, ORDER_STREAM))
        return iter(torch.randperm(self.n, generator=generator).tolist())


def make_loader(
    dataset: ManifestDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` with the seeded epoch order and the skipping collate;
    call ``set_epoch(epoch)`` on it (or on its sampler) before each epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = EpochShuffleSampler(len(dataset), seed=seed, shuffle=shuffle)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skipping_unreadable,
        drop_last=drop_last,
        persistent_workers=False,  # workers must see the dataset's epoch, set before each epoch
        pin_memory=torch.cuda.is_available(),
    )
