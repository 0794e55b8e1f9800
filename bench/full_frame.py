"""Real C-NMC cells on a full-frame smear: images unlike C-NMC's for issue 21's check of the defaults.

C-NMC's cells are segmented: every pixel outside the cell is exactly black. Labs that do not segment hand over crops
in which the cell sits among red cells on stained plasma. This script puts every real cell of a C-NMC folder onto
such a smear (alldetect's demo smear: pale plasma, red discs with paler centres, blob noise), keeping the cell's own
pixels untouched and the layout, names and labels of the source, so the same fold file splits both sets alike:
  python bench/full_frame.py /data/cnmc-fold1/C-NMC_training_data /data/cnmc-fold1-fullframe/C-NMC_training_data
Each person's smears share a tint (slide and stain differ between people, as they do between C-NMC's people), and
each image has its own red cells (seeded by its name, so a rerun writes the same bytes). The mask is the cell's
non-black pixels, feathered over 2 px so no black rim is left.
"""
from __future__ import annotations

import argparse
import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from alldetect.data.demo import smear_background


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def person(name: str) -> str:
    """UID_H14_14_2_hem.bmp -> H14 (C-NMC's subject is the second field)."""
    return name.split("_")[1]


def on_smear(src: Path, dst: Path) -> None:
    bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"error: cannot read {src} as an image")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    tint = np.random.default_rng(_seed(person(src.name))).normal(1.0, 0.05, 3).astype(np.float32)
    smear = smear_background(np.random.default_rng(_seed(src.name))) * tint
    if smear.shape[:2] != rgb.shape[:2]:
        smear = cv2.resize(smear, rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    cell = (rgb.max(axis=2) > 0).astype(np.float32)
    alpha = cv2.GaussianBlur(cv2.erode(cell, np.ones((3, 3), np.uint8)), (5, 5), 0)[..., None]
    out = np.clip(rgb * alpha + smear * (1 - alpha), 0, 255).astype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dst), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)):
        raise SystemExit(f"error: cannot write {dst}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a C-NMC folder (e.g. C-NMC_training_data) with the cells on black")
    p.add_argument("out", type=Path, help="where the same layout is written with the cells on a smear")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    sources = sorted(a.source.rglob("*.bmp"))
    if not sources:
        raise SystemExit(f"error: no .bmp images under {a.source}: give the folder get-cnmc-fold1.sh wrote")
    pairs = [(s, a.out / s.relative_to(a.source)) for s in sources]
    todo = [(s, d) for s, d in pairs if not d.is_file()]
    with ProcessPoolExecutor(a.workers) as pool:
        list(tqdm(pool.map(on_smear, *zip(*todo), chunksize=16) if todo else [], total=len(todo),
                  desc="cells onto smears", unit="img"))
    print(f"{len(pairs)} images in {a.out} ({len(pairs) - len(todo)} were there already)")


if __name__ == "__main__":
    main()
