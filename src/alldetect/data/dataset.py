"""Dataset, sampler and loaders. Images come out as uint8 CHW tensors; the device normalises them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alldetect.data.images import preprocess, read_rgb
from alldetect.data.transforms import apply_transform, sample_seed


class CellDataset(Dataset):
    """Reads, crops, resizes and (for training) augments one image.

    The sampler passes `epoch * len(self) + i`, so each worker knows the epoch without shared state, and the
    augmentation of image i in epoch e is the same in every run with this seed."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], crop: int, size: int,
                 transform=None, seed: int = 0, image_source=None):
        self.root, self.paths, self.labels = Path(root), list(paths), np.asarray(labels, dtype=np.int64)
        self.crop, self.size, self.transform, self.seed = crop, size, transform, seed
        self.image_source = image_source  # optional decoded-image cache: index -> preprocessed uint8 HWC

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        if self.image_source is not None:
            return self.image_source(i)
        return preprocess(read_rgb(self.root / self.paths[i]), self.crop, self.size)

    def __getitem__(self, item: int):
        epoch, i = divmod(int(item), len(self.paths))
        img = apply_transform(self.transform, self.load(i), sample_seed(self.seed, epoch, i))
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return tensor, int(self.labels[i]), i


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced, with replacement) order that depends only on (seed, epoch); shards the
    order across ranks for data-parallel training. Yields `epoch * n + i` for CellDataset."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: np.ndarray | None = None,
                 rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            p = self.weights / self.weights.sum()
            idx = rng.choice(self.n, size=self.n, replace=True, p=p)
        elif self.shuffle:
            idx = rng.permutation(self.n)
        else:
            idx = np.arange(self.n)
        if self.world > 1:  # pad so every rank gets the same number of samples
            pad = (-len(idx)) % self.world
            idx = np.concatenate([idx, idx[:pad]])[self.rank::self.world]
        return idx

    def __iter__(self):
        return iter((self.epoch * self.n + self.order()).tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world)


def make_loader(dataset: CellDataset, batch_size: int, sampler: Sampler, num_workers: int,
                pin_memory: bool, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
