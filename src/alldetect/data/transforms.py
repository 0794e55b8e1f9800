"""Training-only augmentations (albumentations), seeded per (run seed, epoch, image) so that a run is
reproducible however many workers load it and whenever it is resumed."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from alldetect.config import AugConfig

# Normalisation happens on the device, on whole uint8 batches (less to copy, see engine.loop).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_transform(aug: AugConfig) -> A.Compose | None:
    """The report's rot90 / rot270 / flips (exact pixel permutations), plus optional any-angle rotation and
    colour jitter. None when every probability is zero."""
    steps: list[A.BasicTransform] = []
    if aug.rot90:  # transpose + vertical flip = 90 degrees counter-clockwise
        steps.append(A.Sequential([A.Transpose(p=1), A.VerticalFlip(p=1)], p=aug.rot90))
    if aug.rot270:  # transpose + horizontal flip = 270 degrees counter-clockwise
        steps.append(A.Sequential([A.Transpose(p=1), A.HorizontalFlip(p=1)], p=aug.rot270))
    if aug.hflip:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate:  # the cell is round and sits on black, so any angle is safe
        steps.append(A.Rotate(limit=180, border_mode=cv2.BORDER_CONSTANT, fill=0, p=aug.rotate))
    if aug.color_jitter:
        steps.append(A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.03, p=aug.color_jitter))
    return A.Compose(steps, seed=0) if steps else None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible seed for one image in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def apply_transform(transform: A.Compose | None, image: np.ndarray, seed: int) -> np.ndarray:
    if transform is None:
        return image
    # One shared generator for every step: albumentations' set_random_seed gives each child the *same* seed,
    # which makes their coin flips identical (hflip always together with vflip).
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=image)["image"]
