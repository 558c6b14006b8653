"""Manifest rows as model inputs, for training and evaluation alike.

The evaluation transform is :class:`dfd_lib.data.preprocess.InputTransform`, the one ``dfd predict``
uses, after decoding with :func:`dfd_lib.data.images.load_rgb`; so a validation AUC measured here is
the AUC ``dfd predict`` gives.
Training adds light augmentation (a random resized crop and a horizontal flip) drawn from a
generator seeded by ``(seed, epoch, index)``: the same sample gets the same augmentation in
any worker, any process and after a resume.

Unreadable images never stop a run: the sample comes back as an error record, the collate
function drops it and lists it in the batch's ``skipped`` entry for the caller to report.
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

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def to_tensor(self, rgb: np.ndarray, generator_seed: int | None = None) -> torch.Tensor:
        """HxWx3 uint8 -> normalised ``(3, S, S)``; with ``generator_seed``, augmented."""
        x = self.transform.normalise(rgb)
        flip = False
        if generator_seed is not None and self.augment is not None:
            # torchvision draws crop parameters from the global RNG: fork it, seed it per sample
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(generator_seed)
                if self.augment.crops:
                    top, left, height, width = RandomResizedCrop.get_params(x, list(self.augment.crop_scale), list(self.augment.crop_ratio))
                    x = x[:, top : top + height, left : left + width]
                flip = self.augment.hflip and bool(torch.rand(()) < 0.5)
        x = self.transform.resize(x)
        return x.flip(-1) if flip else x

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            rgb = np.array(load_rgb(path))  # writable: torch.from_numpy warns on read-only arrays
        except (ImageLoadError, OSError) as exc:
            return {"index": index, "path": path, "error": getattr(exc, "reason", str(exc))}
        seed = sample_seed(self.seed, self.epoch, index) if self.train else None
        return {"image": self.to_tensor(rgb, seed), "label": int(self.labels[index]), "index": index}


def collate_skipping_unreadable(items: list[dict]) -> dict:
    """Stack the readable samples; ``skipped`` lists ``(path, reason)`` of the others."""
    good = [item for item in items if "error" not in item]
    skipped = [(item["path"], item["error"]) for item in items if "error" in item]
    if not good:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                "index": torch.empty(0, dtype=torch.long), "skipped": skipped}
    return {
        "image": torch.stack([item["image"] for item in good]),
        "label": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": skipped,
    }


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
