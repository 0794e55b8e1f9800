"""Training-only augmentations, seeded per (run seed, epoch, image) so that a run is reproducible however many
workers load it and whenever it is resumed.

The report's rot90 / rot270 / flips are exact pixel permutations: composed as numpy views, then done in at
most one OpenCV transpose and one flip (at 300 x 300 about 10x cheaper than four albumentations steps).
Rotation by any angle and colour jitter, which resample, come from albumentations.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from alldetect.config import AugConfig

# Normalisation happens on the device, on whole uint8 batches (less to copy, see engine.loop).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Augment:
    """image (H x W x 3 uint8), seed -> augmented image (contiguous)."""

    def __init__(self, aug: AugConfig):
        self.probs = np.array([aug.rot90, aug.rot270, aug.hflip, aug.vflip])
        steps: list[A.BasicTransform] = []
        if aug.rotate:  # the cell is round, so any angle is safe; the corners fill as the background is
            # a run resolves border=auto from its images (engine.folddata); unresolved, auto is black, as before
            border = cv2.BORDER_REFLECT_101 if aug.border == "reflect" else cv2.BORDER_CONSTANT
            steps.append(A.Rotate(limit=aug.rotate_limit, border_mode=border, fill=0, p=aug.rotate))
        if aug.color_jitter:
            s = aug.jitter_strength
            steps.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=0.3 * s, p=aug.color_jitter))
        if aug.stain:  # each image's own stain vectors (Macenko), their intensities scaled and shifted
            steps.append(A.HEStain(method="macenko", intensity_scale_range=(0.7, 1.3),
                                   intensity_shift_range=(-0.2, 0.2), p=aug.stain))
        self.resampling = A.Compose(steps) if steps else None

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        return np.ascontiguousarray(self.view(image, seed))

    def view(self, image: np.ndarray, seed: int) -> np.ndarray:
        """The augmented image; `image` itself when nothing applies (so the caller copies it only once)."""
        rng = np.random.default_rng(seed)
        rot90, rot270, hflip, vflip = rng.random(4) < self.probs
        if rot90:
            image = np.rot90(image, 1)
        if rot270:
            image = np.rot90(image, 3)
        if hflip:
            image = image[:, ::-1]
        if vflip:
            image = image[::-1]
        image = _materialise(image)
        if self.resampling is not None:
            # One shared generator for every step: albumentations' set_random_seed gives each child the
            # *same* seed, which makes their coin flips identical.
            self.resampling.set_random_state(rng, random.Random(seed))
            image = self.resampling(image=np.ascontiguousarray(image))["image"]
        return image


def _materialise(view: np.ndarray) -> np.ndarray:
    """Copy a flipped / quarter-turned view with OpenCV's vectorised transpose and flip: numpy copies views
    with reversed or swapped pixel strides byte by byte, about 15x slower. A view of no change is returned
    as it is (it copies fast)."""
    s0, s1 = view.strides[:2]
    sy, sx = (-1 if s0 < 0 else 1), (-1 if s1 < 0 else 1)
    transposed = abs(s0) < abs(s1)
    upright = view[::sy, ::sx]
    if transposed:
        upright = upright.transpose(1, 0, 2)
    if not upright.flags.c_contiguous:  # not a view of one contiguous image: let numpy copy it
        return np.ascontiguousarray(view)
    out = cv2.transpose(upright) if transposed else upright
    code = {(-1, -1): -1, (-1, 1): 0, (1, -1): 1}.get((sy, sx))
    return out if code is None else cv2.flip(out, code)


def create_transform(aug: AugConfig) -> Augment | None:
    """None when every probability is zero."""
    return Augment(aug) if any([aug.rot90, aug.rot270, aug.hflip, aug.vflip, aug.rotate, aug.color_jitter,
                                aug.stain]) else None


def worker_only(aug: AugConfig) -> AugConfig:
    """What stays in the loader workers under augment_on=gpu: the stain augmentation (no batched version)."""
    return AugConfig(rot90=0, rot270=0, hflip=0, vflip=0, rotate=0, color_jitter=0, stain=aug.stain)


def sample_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """A distinct, reproducible seed for one image in one epoch (or one batch in one epoch, of one process)."""
    return int(np.random.SeedSequence([seed, epoch, index] + ([rank] if rank else [])).generate_state(1)[0])

