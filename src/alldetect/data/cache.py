"""Decoded-image cache: every image after the fixed steps (crop, resize) as uint8, in one memory-mapped file
per (data fingerprint, crop, size), shared by every later run, fold, trial and architecture of that size.

    data/cache/<dataset>-<fingerprint>-<mtimes>-c<crop>-s<size>.u8    N x size x size x 3 uint8, rows in sorted
                                                                     path order
    data/cache/<dataset>-<fingerprint>-<mtimes>-c<crop>-s<size>.json  the paths, so a row can be found by path

The data fingerprint (relative paths and file sizes) and a digest of the files' modification times are in the
name (see `cache_stem`), so changed data get a new cache and never read a stale one. The .u8 file appears by an
atomic rename only once complete: a killed build leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from alldetect.atomic import atomic_path, check_writable, write_text
from alldetect.data.images import fingerprint, preprocess, read_rgb
from alldetect.data.layouts import dataset_name

log = logging.getLogger("alldetect")


class ImageCache:
    """Rows of preprocessed images; opens the memory map lazily, so it pickles cheaply into loader workers."""

    def __init__(self, file: Path, paths: list[str], size: int):
        self.file, self.paths, self.size = Path(file), list(paths), size
        self.row_of = {p: i for i, p in enumerate(self.paths)}
        self._array: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.file, dtype=np.uint8, mode="r",
                                    shape=(len(self.paths), self.size, self.size, 3))
        return self._array

    def source(self, paths) -> CacheSource:
        return CacheSource(self, [self.row_of[p] for p in paths])


class CacheSource:
    """index in a dataset -> its preprocessed image, a read-only view of the memory map (the dataset copies
    it once, into the batch)."""

    def __init__(self, cache: ImageCache, rows: list[int]):
        self.cache, self.rows = cache, rows

    def __call__(self, i: int) -> np.ndarray:
        return self.cache.array[self.rows[i]]


def cache_stem(root: Path, paths: list[str], crop: int, size: int) -> str:
    """The data fingerprint (paths and sizes, shared with fold files, which travel between machines) and, since
    the cache is local, the files' modification times: an image rewritten at the same size (every C-NMC BMP has
    the same size) gets a new cache instead of its old decoded pixels."""
    digest, _ = fingerprint(root, paths)
    times = hashlib.sha256("".join(f"{(Path(root) / p).stat().st_mtime_ns}\n" for p in sorted(paths)).encode())
    return f"{dataset_name(root)}-{digest}-{times.hexdigest()[:8]}-c{crop}-s{size}"


def image_cache(root: str | Path, paths: list[str], crop: int, size: int, cache_dir: str | Path = "data/cache",
                workers: int = 8) -> ImageCache:
    """Open the cache for these images, building it first if it does not exist yet."""
    root, paths = Path(root), sorted(paths)
    stem = cache_stem(root, paths, crop, size)
    file, index = Path(cache_dir) / f"{stem}.u8", Path(cache_dir) / f"{stem}.json"
    if file.is_file() and index.is_file() and json.loads(index.read_text())["paths"] == paths:
        return ImageCache(file, paths, size)
    check_writable(cache_dir, "the image cache folder (data.cache_dir)")
    log.info("caching %d decoded images at %d x %d in %s (once for this data and size)", len(paths), size, size, file)
    with atomic_path(file) as tmp:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(paths), size, size, 3))

        def fill(i: int) -> None:
            array[i] = preprocess(read_rgb(root / paths[i]), crop, size)  # noqa: F821 (deleted only after use)

        with ThreadPoolExecutor(workers) as pool:  # cv2 releases the GIL while decoding and resizing
            list(tqdm(pool.map(fill, range(len(paths))), total=len(paths), desc="cache", unit="img",
                      leave=False, disable=None))
        array.flush()
        del array
    write_text(index, json.dumps({"root": str(root), "crop": crop, "size": size, "paths": paths}) + "\n")
    return ImageCache(file, paths, size)
