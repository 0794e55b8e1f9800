"""Built-in synthetic demo data in the C-NMC training layout and naming.

One purple-stained cell per 450 x 450 BMP on black. The classes differ the way C-NMC's do, with overlap:
  all (blast)  about 30 % larger on average, fine (open) chromatin with 1-3 pale nucleoli, a nucleus that is
               often notched or cleft;
  hem (normal) smaller, coarse clumped chromatin, a round smooth nucleus.
Every subject has its own stain (hue, saturation, brightness) and size factor, so global features such as
mean colour and cell area separate the classes poorly across subjects; a CNN has to look at texture and
shape. The data are synthetic: they say nothing about real accuracy.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from alldetect.atomic import check_writable, write_text
from alldetect.errors import UserError

SIZE = 450
README = """# Synthetic demo data (not real cells)

Made by `alldetect demo-data` with {flags}.
It mimics the C-NMC 2019 training layout and file names (`fold_k/all/UID_<subject>_<image>_<cell>_all.bmp`,
`fold_k/hem/UID_H<subject>_..._hem.bmp`, 450 x 450 24-bit BMP) so that every step of alldetect can run on a
fresh machine. Blasts (`all`) are larger on average, with fine chromatin, nucleoli and notched nuclei; normal
cells (`hem`) have coarse clumped chromatin and round nuclei; stain and size vary per subject.
Scores on these images say nothing about real leukemia detection.
"""


def _blob_noise(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth zero-mean unit-variance noise whose blobs are about `scale` px across."""
    small = max(4, int(SIZE / scale))
    field: np.ndarray = rng.standard_normal((small, small)).astype(np.float32)
    field = cv2.resize(field, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _nucleus_mask(rng, cx, cy, radius, irregular: bool) -> np.ndarray:
    """A round nucleus, or (irregular) one with a wavy outline and a cleft cut into it."""
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.full_like(angles, radius)
    wobble = 0.09 if irregular else 0.025
    for harmonic in (2, 3, 5):
        r *= 1 + wobble * rng.uniform(-1, 1) * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
    if irregular:  # a notch: a deep dent over a narrow range of angles
        centre, width, depth = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.5)
        d = np.angle(np.exp(1j * (angles - centre)))
        r *= 1 - depth * np.exp(-(d / width) ** 2 * 3)
    pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1).round().astype(np.int32)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def smear_background(rng: np.random.Generator) -> np.ndarray:
    """A full-frame smear around the cell: pale pink plasma with red blood cells (discs with paler centres), as
    single-cell crops from labs that do not segment their cells look."""
    plasma = np.array([228, 205, 214], np.float32) + rng.normal(0, 6, 3)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = plasma
    img += (_blob_noise(rng, 60) * 6)[..., None]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    red = np.array([205, 120, 135], np.float32) + rng.normal(0, 8, 3)
    for _ in range(rng.integers(10, 18)):
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(30, 42)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
        disc = d <= 1
        pale = np.clip(1 - d, 0, 1) ** 2 * 0.35  # the centre of a red cell is paler
        img[disc] = red * (1 - pale[disc, None]) + plasma * pale[disc, None]
    return img


def render_cell(rng: np.random.Generator, blast: bool, stain: np.ndarray, size_factor: float,
                full_frame: bool = False) -> np.ndarray:
    """One 450 x 450 x 3 uint8 RGB image: the cell on black, or (full_frame) on a smear."""
    cell_r = 95 * size_factor * (1.14 if blast else 1.0) * np.exp(rng.normal(0, 0.10))
    cell_r = float(np.clip(cell_r, 50, 200))
    cx, cy = SIZE / 2 + rng.normal(0, 10), SIZE / 2 + rng.normal(0, 10)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    stretch = rng.uniform(0.92, 1.08)
    cell = ((xx - cx) / stretch) ** 2 + ((yy - cy) * stretch) ** 2 <= cell_r ** 2
    irregular = rng.random() < (0.75 if blast else 0.15)
    nucleus = _nucleus_mask(rng, cx + rng.normal(0, 4), cy + rng.normal(0, 4),
                            cell_r * rng.uniform(0.84, 0.95), irregular) & cell

    # Chromatin: fine and even in blasts, coarse dark clumps in normal cells, at the same mean brightness.
    fine = _blob_noise(rng, 8) * 0.6 + _blob_noise(rng, 4) * 0.4
    coarse = np.maximum(_blob_noise(rng, 22), 0) - 0.4
    fine_looking = blast or rng.random() < 0.12  # some normal cells have fine chromatin too
    texture = fine * 0.12 if fine_looking else coarse * -0.35
    if blast:  # nucleoli: paler round spots
        for _ in range(rng.integers(1, 4)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4) * cell_r
            spot_r = rng.uniform(7, 12)
            spot = (xx - cx - d * np.cos(a)) ** 2 + (yy - cy - d * np.sin(a)) ** 2 <= spot_r ** 2
            texture = np.where(spot, texture + 0.3, texture)
        texture -= 0.03  # keep the mean close to a normal cell's
    brightness = np.clip(1 + texture + rng.normal(0, 0.03), 0.4, 1.8)

    img: np.ndarray = smear_background(rng) if full_frame else np.zeros((SIZE, SIZE, 3), np.float32)
    img[cell] = stain[1]
    img[nucleus] = stain[0][None, :] * brightness[nucleus][:, None]
    img += rng.normal(0, 3, img.shape).astype(np.float32) * (1 if full_frame else cell[..., None])
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    return np.clip(img, 0, 255).astype(np.uint8)


def subject_stain(rng: np.random.Generator) -> np.ndarray:
    """Per-subject (nucleus, cytoplasm) RGB around the C-NMC images' dark Jenner-Giemsa purple."""
    nucleus = np.array([70, 30, 82], np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 5, 3)
    cytoplasm = np.array([95, 60, 120], np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 6, 3)
    return np.clip(np.stack([nucleus, cytoplasm]), 10, 255)


BUILDING_MARKER = ".alldetect-demo-building"


def make_demo_data(out: str | Path, subjects: int = 24, per_subject: int = 25, seed: int = 0,
                   workers: int | None = None, full_frame: bool = False) -> Path:
    """Write the demo set under out/C-NMC_training_data/fold_{0,1,2}/{all,hem}/ and a README; return `out`.
    full_frame: each cell on a smear of red cells instead of on black (images unlike C-NMC's, for tests)."""
    if subjects < 6:
        raise UserError(f"--subjects {subjects}: the demo data need at least 6 subjects (3 folds x 2 classes)")
    if per_subject < 1:
        raise UserError(f"--per-subject {per_subject}: need at least one image per subject")
    out = check_writable(out, "the demo data folder")
    (out / BUILDING_MARKER).touch()  # until the README is written: a stopped build is known as one (not a user's)
    root = out / "C-NMC_training_data"
    n_all = int(round(subjects * 69 / 118))  # the real share of ALL subjects
    seeds = np.random.SeedSequence(seed).spawn(subjects)
    jobs = []
    for s in range(subjects):
        blast = s < n_all
        number = s + 1 if blast else s - n_all + 1
        subject = f"{number}" if blast else f"H{number}"
        fold = (number - 1) % 3
        jobs.append((seeds[s], blast, subject, fold))

    def write_subject(job):
        seq, blast, subject, fold = job
        rng = np.random.default_rng(seq)
        stain, size_factor = subject_stain(rng), float(np.exp(rng.normal(0, 0.12)))
        cls = "all" if blast else "hem"
        folder = root / f"fold_{fold}" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_subject):
            img = render_cell(rng, blast, stain, size_factor, full_frame)
            name = f"UID_{subject}_{i // 3 + 1}_{i % 3 + 1}_{cls}.bmp"
            cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))

    with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:  # each subject has its own generator
        list(pool.map(write_subject, jobs))
    flags = f"--subjects {subjects} --per-subject {per_subject} --seed {seed}" + (" --full-frame" if full_frame else "")
    write_text(out / "README.md", README.format(flags=flags))
    (out / BUILDING_MARKER).unlink(missing_ok=True)
    return out


def is_stopped_build(root: str | Path) -> bool:
    """A demo build that was stopped before its README: what ensure_demo_data may replace (nothing else)."""
    return (Path(root) / BUILDING_MARKER).is_file() and not is_demo_data(root)


def is_demo_data(root: str | Path) -> bool:
    readme = Path(root) / "README.md"
    return readme.is_file() and readme.read_text(encoding="utf-8").startswith("# Synthetic demo data")
