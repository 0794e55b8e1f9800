"""`alldetect train ARCH FOLD` and `alldetect cache ARCH`: resolve config and data, then fit each requested fold
(or build the image cache), and print what was done."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from alldetect.atomic import check_writable
from alldetect.config import Config
from alldetect.data.prepare import data_line, resolve_folds
from alldetect.engine.fit import FULL, FitResult, fit_fold
from alldetect.engine.select import OPTIMISTIC, selection_text
from alldetect.engine.train import fold_number, parse_fold_spec, resolve_config
from alldetect.models import default_input_size

log = logging.getLogger("alldetect")


def train_command(arch: str, fold_spec: str, overrides: list[str], files: list[str] | None = None) -> list[FitResult]:
    # Mistyped names fail at once, before any data are built or folds made (the fold's range is checked below).
    default_input_size(arch)
    fold_number(fold_spec)
    cfg, demo = resolve_config(arch, overrides, files or [])
    if cfg.data.cache:  # every output place is checked before any work
        check_writable(cfg.data.cache_dir, "the image cache folder (data.cache_dir)")
    folds = resolve_folds(cfg)
    print(data_line(cfg, folds), flush=True)
    if cfg.data.root is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(folds.data_root)})})
    wanted = parse_fold_spec(fold_spec, folds.k)
    if folds.leaky:
        log.warning("fold file %s is a leaky split by image: validation scores will be optimistic", folds.path)
    results = [fit_fold(cfg, fold, folds) for fold in wanted]
    print(summary_table(cfg, results, folds.path, demo))
    return results


def cache_command(arch: str, overrides: list[str], files: list[str] | None = None) -> str:
    """Build the decoded-image cache that `data.cache=true` runs of this architecture and size will read."""
    from alldetect.data.cache import image_cache

    cfg, _ = resolve_config(arch, overrides, files or [])
    folds = resolve_folds(cfg)
    print(data_line(cfg, folds), flush=True)
    size = cfg.resolved_input_size
    cache = image_cache(folds.data_root, folds.table["path"].tolist(), cfg.data.crop, size, cfg.data.cache_dir)
    return (f"cache ready: {cache.file} ({len(cache.paths)} images at {size} x {size}, "
            f"{cache.file.stat().st_size / 2**20:.0f} MiB); train with data.cache=true")


def summary_table(cfg: Config, results: list[FitResult], fold_file: Path, demo: bool) -> str:
    if results and results[0].fold is FULL:
        r = results[0]
        return (f"\n{cfg.arch}: {r.run_dir} trained on all {r.train_images} images of {fold_file} for {r.epochs_run} "
                f"epoch(s) and kept {selection_text(cfg.select, cfg.monitor)} (select={cfg.select}); it has no "
                "validation fold, so no scores: the fold runs' out-of-fold scores are its estimate"
                + ("  (SYNTHETIC demo data)" if demo else "") + f".\nPredict with it: alldetect predict {r.run_dir} "
                "--data DIR --name NAME.")
    rows = [{"run": str(r.run_dir), "kept_epoch": r.best_epoch + 1, "epochs": r.epochs_run,
             **{k: round(r.metrics[k], 4) for k in ("f1", "accuracy", "precision", "recall", "roc_auc")}}
            for r in results]
    table = pd.DataFrame(rows).to_string(index=False)
    note = "  (SYNTHETIC demo data)" if demo else ""
    lines = [f"\n{cfg.arch}: validation-fold scores of {selection_text(cfg.select, cfg.monitor)} (select={cfg.select}), "
             f"folds from {fold_file}{note}", table]
    if len(results) > 1:
        f1 = pd.Series([r.metrics["f1"] for r in results])
        lines.append(f"mean weighted F1 over {len(results)} folds: {f1.mean():.4f} +/- {f1.std():.4f}")
    if cfg.select == "outer":
        lines.append(f"{OPTIMISTIC}; select=last or select=inner give scores that are not")
    files = "oof.csv and inner.csv" if cfg.select == "inner" else "and oof.csv"
    lines.append(f"Each run folder holds config.yaml, history.csv, best.pt, last.pt, {files}.")
    return "\n".join(lines)
