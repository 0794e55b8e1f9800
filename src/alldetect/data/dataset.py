"""Dataset, sampler and loaders. Images come out as uint8 H x W x 3 tensors (no transposing copy in the
workers); the device permutes them to N x 3 x H x W (channels_last in memory) and normalises them."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from alldetect.data.images import preprocess, read_rgb
from alldetect.data.transforms import sample_seed
from alldetect.errors import UserError


class CellDataset(Dataset):
    """Reads, crops, resizes and (for training) augments images.

    The sampler passes `epoch * len(self) + i`, so each worker knows the epoch without shared state, and the
    augmentation of image i in epoch e is the same in every run with this seed. `__getitems__` builds a whole
    batch in one buffer (shared memory inside a loader worker), so flipped views of cached rows are copied
    once, straight into the batch."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], crop: int, size: int,
                 transform=None, seed: int = 0, image_source=None):
        self.root, self.paths, self.labels = Path(root), list(paths), np.asarray(labels, dtype=np.int64)
        self.crop, self.size, self.transform, self.seed = crop, size, transform, seed
        self.image_source = image_source  # optional decoded-image cache: index -> preprocessed uint8 HWC view

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        if self.image_source is not None:
            return self.image_source(i)
        return preprocess(read_rgb(self.root / self.paths[i]), self.crop, self.size)

    def _image(self, item: int) -> tuple[np.ndarray, int]:
        epoch, i = divmod(int(item), len(self.paths))
        img = self.load(i)
        if self.transform is not None:
            img = self.transform.view(img, sample_seed(self.seed, epoch, i))
        return img, i

    def __getitem__(self, item: int):
        images, labels, rows = self.__getitems__([item])
        return images[0], int(labels[0]), int(rows[0])

    def __getitems__(self, items: list[int]):
        images = torch.empty((len(items), self.size, self.size, 3), dtype=torch.uint8)
        if get_worker_info() is not None:  # what default_collate does: no copy when sent to the main process
            images = images.share_memory_()
        buffer = images.numpy()
        rows = np.empty(len(items), dtype=np.int64)
        for j, item in enumerate(items):
            buffer[j], rows[j] = self._image(item)
        return images, torch.from_numpy(self.labels[rows]), torch.from_numpy(rows)


def _batched(batch):
    """collate_fn for CellDataset.__getitems__, which already returns a whole batch."""
    return batch


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced, with replacement) order that depends only on (seed, epoch); shards the
    order across ranks for data-parallel training. Yields `epoch * n + i` for CellDataset."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: np.ndarray | None = None,
                 rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world, self.epoch, self.skip = rank, world, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch`, leaving out its first `skip` samples (those of a resumed, half-done epoch)."""
        self.epoch, self.skip = epoch, skip

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
        return iter((self.epoch * self.n + self.order()[self.skip:]).tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world) - self.skip


def unwrap_worker_message(message: str) -> str:
    """torch re-raises a worker's exception with its traceback as the message: keep what was raised."""
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    return message.rsplit(marker, 1)[1].strip() if message.startswith("Caught ") and marker in message else message


def _worker_init(_: int) -> None:
    # The main process decides when to stop on SIGINT/SIGTERM (after the current step, with a checkpoint);
    # workers that died first would break that step. They end with the main process anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader(DataLoader):
    """A DataLoader whose persistent workers can be stopped at a known moment (`close()`, or `with`).

    Its workers ignore SIGTERM (see `_worker_init`), so a loader still alive when Python exits would leave
    multiprocessing's exit handler waiting for them forever (seen in `alldetect tune`, whose trials' loaders
    outlived the trials). Every user closes its loaders when done, rather than waiting for garbage collection."""

    def __iter__(self):
        """As DataLoader's, but a UserError raised in a worker (an image that went bad) arrives as its own clear
        message, not wrapped in the worker's traceback. The workers start (or, persistent, resume) fetching when
        iter() is called, not at the first batch: training starts the next epoch's fetching before it validates."""
        return self._batches(super().__iter__())

    @staticmethod
    def _batches(iterator):
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except UserError as e:
                raise UserError(unwrap_worker_message(str(e))) from None
            yield batch

    def close(self) -> None:
        """Stop the persistent workers now. DataLoader has no public call for it: `_shutdown_workers` is what its
        iterator's __del__ runs, and waiting for garbage collection left workers that ignore SIGTERM alive."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(dataset: CellDataset, batch_size: int, sampler: Sampler, num_workers: int,
                pin_memory: bool, drop_last: bool = False) -> Loader:
    return Loader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, collate_fn=_batched, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=_worker_init,
    )
