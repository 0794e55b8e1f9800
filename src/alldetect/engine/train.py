"""What a training command resolves before fitting: which folds a FOLD argument names, and the run's config (the demo
data and profile when no data are configured). The command itself: alldetect.commands.train."""

from __future__ import annotations

import logging
import re

from alldetect.config import Config, load_config
from alldetect.data.demo import is_demo_data
from alldetect.data.folds import fold_file_root
from alldetect.data.prepare import demo_banner, ensure_demo_data
from alldetect.engine.fit import FULL
from alldetect.errors import UserError

log = logging.getLogger("alldetect")


def fold_number(spec: str, k: int | None = None) -> int | None:
    """'fold3' -> 3, 'all' or 'full' -> None; anything else (or a fold >= k, when k is known) is an error that
    lists the choices. Without k it checks only the form, before any data are built."""
    m = re.fullmatch(r"fold(\d+)", spec)
    if spec not in ("all", "full") and (not m or (k is not None and int(m.group(1)) >= k)):
        choices = f"fold0 .. fold{k - 1}" if k is not None else "fold0, fold1, ..."
        raise UserError(f"'{spec}' is not a fold: use {choices}, all (every fold), or full (one model trained on "
                        "every image)")
    return int(m.group(1)) if m else None


def parse_fold_spec(spec: str, k: int) -> list[int | None]:
    """'fold0' -> [0], 'all' -> [0..k-1], 'full' -> [None] (FULL: every image, no validation fold)."""
    if spec == "full":
        return [FULL]
    number = fold_number(spec, k)
    return list(range(k)) if number is None else [number]


def resolve_config(arch: str, overrides: list[str], files: list[str]) -> tuple[Config, bool]:
    """The run's config; with no data configured, the demo data and the demo profile (which the demo data also get
    when named, by data.root= or a fold file of them). Returns (cfg, demo)."""
    cfg = load_config(arch, overrides, files)
    if cfg.data.root is None and cfg.data.fold_file is None:
        root = ensure_demo_data()
        print(demo_banner(root), flush=True)
        return load_config(arch, [*overrides, f"data.root={root}"], files, profile="demo"), True
    if is_demo_data(cfg.data.root or fold_file_root(cfg.data.fold_file or "")):
        return load_config(arch, overrides, files, profile="demo"), True
    return cfg, False
