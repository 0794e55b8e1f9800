"""Data pipeline images/s at 300 x 300 with the report's augmentations, side by side on the same images:

  naive     PIL decode + torchvision transforms (crop, resize, rotations, flips, to float, normalise) every
            epoch, in the loader workers: what most public C-NMC code does
  uncached  alldetect's loader without the cache: OpenCV decode + crop/resize + albumentations, uint8 batches
            normalised on the device
  cached    alldetect's loader with the decoded-image cache (crop/resize done once): workers copy bytes and
            flip/rotate them
Two rates per pipeline: `loader` counts the batches the DataLoader hands to the training step (the CPU-side
pipeline that has to keep a GPU busy; the headline), `on_device` also moves them to the device and, for
alldetect, normalises them there. On a GPU the two are close; on a CPU-only machine the CPU does that
normalisation too. The cache build is timed on its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from alldetect.config import AugConfig
from alldetect.data.cache import image_cache
from alldetect.data.dataset import CellDataset, EpochSampler, Loader, make_loader
from alldetect.data.layouts import build_manifest
from alldetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD, create_transform
from alldetect.engine.loop import DeviceBatch, resolve_device


class NaiveDataset(Dataset):
    def __init__(self, root: Path, paths: list[str], crop: int, size: int):
        from torchvision import transforms as T

        rot = [T.RandomApply([T.Lambda(lambda im: im.transpose(Image.Transpose.ROTATE_90))], p=0.5),
               T.RandomApply([T.Lambda(lambda im: im.transpose(Image.Transpose.ROTATE_270))], p=0.5)]
        self.root, self.paths = root, paths
        self.transform = T.Compose([T.CenterCrop(crop), T.Resize(size), *rot, T.RandomHorizontalFlip(),
                                    T.RandomVerticalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.root / self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


def _images_per_s(loader, epochs: int, prepare) -> float:
    """Time `epochs` passes after the first batch (worker start-up is not the pipeline's throughput)."""
    n, start = 0, 0.0
    with loader:
        for _ in range(epochs + 1):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(_)
            for batch in loader:
                prepare(batch[0])
                if not start:
                    start = time.perf_counter()
                    continue
                n += len(batch[0])
        return n / (time.perf_counter() - start)


def run(data_root: str | Path, images: int = 320, size: int = 300, crop: int = 400, workers: int = 2,
        batch_size: int = 32, epochs: int = 2, device: str = "auto", cache_dir: str = "data/cache") -> pd.DataFrame:
    root = Path(data_root)
    paths = sorted(build_manifest(root)["path"].tolist())[:images]
    dev = DeviceBatch(resolve_device(device), channels_last=False, amp=False)

    def to_device(x):
        x = x.to(dev.device, non_blocking=True)
        if dev.cuda:
            torch.cuda.synchronize()
        return x

    def naive():
        return Loader(NaiveDataset(root, paths, crop, size), batch_size=batch_size, shuffle=True,
                      num_workers=workers, pin_memory=dev.cuda, persistent_workers=workers > 0)

    transform = create_transform(AugConfig())
    labels = np.zeros(len(paths), dtype=int)

    def ours(source):
        ds = CellDataset(root, paths, labels, crop, size, transform, seed=0, image_source=source)
        return make_loader(ds, batch_size, EpochSampler(len(ds), 0, True), workers, dev.cuda)

    start = time.perf_counter()
    cache = image_cache(root, paths, crop, size, cache_dir)
    build = time.perf_counter() - start
    pipelines = [("naive: PIL + torchvision every epoch", naive, to_device),
                 ("uncached: OpenCV + flips, uint8", lambda: ours(None), dev.images),
                 ("cached: memory-mapped uint8 + flips", lambda: ours(cache.source(paths)), dev.images)]
    rows = [(name, _images_per_s(make(), epochs, lambda x: None), _images_per_s(make(), epochs, prepare))
            for name, make, prepare in pipelines]
    table = pd.DataFrame(rows, columns=["pipeline", "loader", "on_device"])
    table["vs_naive"] = table["loader"] / table["loader"].iloc[0]
    table["on_device_vs_naive"] = table["on_device"] / table["on_device"].iloc[0]
    table.attrs["cache_build_s"] = build
    table.attrs["setup"] = (f"{len(paths)} images of {root}, {size} x {size}, crop {crop}, {workers} workers, "
                            f"batch {batch_size}, {epochs} epochs timed, device {dev.device}")
    return table


def report(table: pd.DataFrame) -> str:
    return "\n".join([
        f"data pipeline: {table.attrs['setup']}",
        "images/s:",
        table.to_string(index=False, formatters={"loader": "{:.0f}".format, "on_device": "{:.0f}".format,
                                                 "vs_naive": "{:.2f}x".format, "on_device_vs_naive": "{:.2f}x".format}),
        f"cache build (once per data and size): {table.attrs['cache_build_s']:.1f} s",
        f"speedup: {table['vs_naive'].iloc[-1]:.2f}x  (cached loader against the naive loader)",
    ])
