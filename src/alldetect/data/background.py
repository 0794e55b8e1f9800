"""What lies around the cells: black (segmented cells, as C-NMC's) or a smear (full-frame crops from other labs).

Rotating an image by any angle uncovers its corners. On a black background, filling them with black changes
nothing a network could learn from; on a full-frame smear it paints black triangles that clean images never have.
`aug.border=auto` therefore looks at the training images' corners once per run and picks `black` or `reflect`,
and says which and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alldetect.data.images import center_crop, read_rgb

SAMPLE = 32  # images looked at: evenly spaced over the sorted paths, so the same images every time
CORNER = 0.08  # each corner patch's side, as a share of the image's
DARK = 24  # a pixel whose brightest channel is below this is background black
BLACK_SHARE = 0.9  # an image has black corners when this share of its corner pixels are dark


@dataclass(frozen=True)
class Background:
    kind: str  # "black" or "full-frame"
    black_corners: int  # sampled images whose corners are black
    sampled: int

    @property
    def border(self) -> str:
        """How rotations should fill the corners they uncover."""
        return "black" if self.kind == "black" else "reflect"

    @property
    def fill(self) -> str:
        """The border in words, for the messages that say what rotations will do."""
        return "black" if self.border == "black" else "a reflection of the image"

    def describe(self) -> str:
        what = ("segmented cells on black, as C-NMC's" if self.kind == "black"
                else "full-frame images (cells on a smear, not on black)")
        return f"{what}: {self.black_corners} of {self.sampled} sampled images have black corners"


def corners_are_black(image: np.ndarray) -> bool:
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * CORNER)), max(1, round(w * CORNER))
    patches = [image[:ch, :cw], image[:ch, -cw:], image[-ch:, :cw], image[-ch:, -cw:]]
    dark = np.concatenate([(p.max(axis=2) < DARK).ravel() for p in patches])
    return bool(dark.mean() >= BLACK_SHARE)


def inspect_background(root: str | Path, paths: Sequence[str], crop: int = 0) -> Background:
    """Black when at least 90 % of the sampled images (centre-cropped to `crop` as training does) have black
    corners, else full-frame."""
    ordered = sorted(paths)
    picks = [ordered[i] for i in np.unique(np.linspace(0, len(ordered) - 1, min(SAMPLE, len(ordered))).astype(int))]
    black = sum(corners_are_black(center_crop(read_rgb(Path(root) / p), crop)) for p in picks)
    kind = "black" if black >= BLACK_SHARE * len(picks) else "full-frame"
    return Background(kind, black, len(picks))
