"""From a config to verified training data: the data root (or the built-in demo set) and its fold file."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from alldetect.config import DATA_ENV, Config
from alldetect.data.demo import is_demo_data, is_stopped_build, make_demo_data
from alldetect.data.folds import FoldFile, default_fold_path, fold_summary, load_fold_file, make_fold_file
from alldetect.data.layouts import build_manifest
from alldetect.errors import UserError
from alldetect.locks import exclusive

log = logging.getLogger("alldetect")

DEMO_ROOT = Path("data/demo")
DEMO_BANNER = """\
==============================================================================
 No data set configured (data.root= or ALLDETECT_DATA): using the built-in
 SYNTHETIC demo data in {root}. Scores on it say nothing about real cells.
 For C-NMC: ./train.sh ARCH FOLD data.root=/path/to/C-NMC_training_data
=============================================================================="""


def _put_in_place(building: Path, root: Path) -> None:
    """Rename a finished build to `root`, one process (or thread) at a time: under a lock beside it, a complete set
    already there wins, a stopped build is removed first, and anything else is left alone with an error. Without
    the lock, one run removing a stopped build while another looked at it saw a half-removed folder and stopped
    with an error, though both would have built the same data."""
    with exclusive(root.parent / f".{root.name}.lock", f"the demo data folder {root}", wait=True):
        if is_demo_data(root):  # another run finished first
            return
        if is_stopped_build(root):  # a killed `alldetect demo-data` left it; never a folder of the user's
            shutil.rmtree(root)
        try:
            os.rename(building, root)  # onto nothing, or an empty folder
        except OSError:
            if root.exists():
                raise UserError(f"{root} exists and holds no demo data of alldetect's (nor a stopped build of them): "
                                "it is left as it is. Move it away to build the demo data there, or configure your "
                                f"data set (data.root=DIR or {DATA_ENV})") from None
            raise UserError(f"could not put the demo data in place at {root}: remove that folder and try again") \
                from None


def ensure_demo_data(root: Path = DEMO_ROOT) -> Path:
    """Build the demo set once; later calls reuse it.

    Built in a temporary folder beside `root` and renamed into place, so that runs started together on a fresh
    checkout (tuning workers, a fold per process) never read a half-written image: the first complete build
    wins, the others are discarded. A folder left by a killed `alldetect demo-data` (its building marker, no README
    yet) is replaced; any other folder in the way is an error, never removed."""
    root = Path(root)
    if is_demo_data(root):
        return root
    log.info("building the synthetic demo data in %s (once) ...", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.building-"))
    try:
        make_demo_data(building)
        _put_in_place(building, root)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def demo_banner(root: Path = DEMO_ROOT) -> str:
    return DEMO_BANNER.format(root=root)


def data_line(cfg: Config, folds: FoldFile) -> str:
    """Which images a command reads, and where that came from: printed before any work."""
    if cfg.data.root is None:
        source = f"from the sidecar of {folds.path}"
    elif os.environ.get(DATA_ENV) == cfg.data.root:
        source = f"from ${DATA_ENV}"
    else:
        source = "data.root"
    return f"data: {folds.data_root} ({source}); folds: {folds.path} ({folds.k} folds, {len(folds.table)} images)"


def resolve_folds(cfg: Config) -> FoldFile:
    """Load the configured fold file (checked against the data), or make the default one on first use."""
    if cfg.data.fold_file:  # its sidecar knows the data root when none is given
        return load_fold_file(cfg.data.fold_file, cfg.data.root)
    root = Path(cfg.data.root or "")
    if not root.is_dir():  # say so before naming a fold file after it
        build_manifest(root)
    path = default_fold_path(cfg.folds_dir, root, cfg.data.k, cfg.seed, cfg.data.split_by)
    if path.is_file():
        return load_fold_file(path, root)
    log.info("making fold file %s (%s-grouped, k=%d, seed=%d)", path, cfg.data.split_by, cfg.data.k, cfg.seed)
    folds = make_fold_file(root, path, cfg.data.k, cfg.seed, cfg.data.split_by, cfg.data.skip_bad)
    log.info("folds:\n%s", fold_summary(folds.table).to_string())
    return folds
