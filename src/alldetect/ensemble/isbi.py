"""The C-NMC challenge's submission format: isbi_valid.predict (one 0/1 line per image 1.bmp .. N.bmp) and its zip."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect.atomic import atomic_path, write_text
from alldetect.data.layouts import NUMBERED_RE
from alldetect.errors import short_list


def isbi_lines(images: pd.Series, labels: np.ndarray) -> tuple[list[str] | None, str]:
    """Lines of isbi_valid.predict (line i is the 0/1 label of i.bmp), or None and why the images are not a
    C-NMC numbered test folder."""
    names = images.map(lambda p: Path(p).name)
    folders = images.map(lambda p: str(Path(p).parent))
    matches = names.map(NUMBERED_RE.match)
    if folders.nunique() != 1 or not matches.map(bool).all():
        return None, "the images are not a C-NMC test folder (1.bmp ... N.bmp in one folder)"
    numbers = matches.map(lambda m: int(m.group(1))).to_numpy()
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        gaps = sorted(set(range(1, len(numbers) + 1)) - set(numbers))
        return None, f"the images are not numbered 1..{len(numbers)} without gaps (missing {short_list(gaps)})"
    order = np.argsort(numbers)
    return [str(int(v)) for v in np.asarray(labels)[order]], ""


def write_isbi(folder: Path, lines: list[str]) -> tuple[Path, Path]:
    """isbi_valid.predict and a zip of it (fixed timestamp, so the same labels give the same bytes)."""
    text = "\n".join(lines) + "\n"
    predict_file, zip_file = folder / "isbi_valid.predict", folder / "isbi_valid.zip"
    write_text(predict_file, text)
    with atomic_path(zip_file) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            entry = zipfile.ZipInfo("isbi_valid.predict", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, text)
    return predict_file, zip_file
