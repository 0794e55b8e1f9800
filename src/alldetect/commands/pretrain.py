"""`alldetect pretrain ARCH FOLD`: self-supervised pretraining (engine/pretrain.py) of each requested fold's
encoder, then the command that fine-tunes from it."""

from __future__ import annotations

import re
from pathlib import Path

from alldetect.data.prepare import data_line, resolve_folds
from alldetect.engine.pretrain import FORCED, check_pretrainable, pretrain_fold
from alldetect.engine.train import parse_fold_spec, resolve_config
from alldetect.errors import UserError
from alldetect.models import default_input_size


def pretrain_command(arch: str, fold_spec: str, overrides: list[str], files: list[str] | None = None) -> list[Path]:
    """FOLD: fold<k> (every other fold's images: the honest start for fold k's run), each (every fold in turn), or
    all (every image, the scored people's included: transductive). Returns the encoder files."""
    default_input_size(arch)
    check_pretrainable(arch)
    number = re.fullmatch(r"fold(\d+)", fold_spec)
    if fold_spec not in ("each", "all") and not number:
        raise UserError(f"'{fold_spec}' is not what pretrain takes: fold<k> (the images of every other fold, the "
                        "honest start for fold k), each (every fold in turn), or all (every image, transductive)")
    cfg, _ = resolve_config(arch, [*overrides, *FORCED], files or [])
    folds = resolve_folds(cfg)
    print(data_line(cfg, folds), flush=True)
    if cfg.data.root is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(folds.data_root)})})
    if number and int(number.group(1)) >= folds.k:
        raise UserError(f"'{fold_spec}' is not a fold of {folds.path}: use fold0 .. fold{folds.k - 1}, each, or all")
    wanted = parse_fold_spec({"each": "all", "all": "full"}.get(fold_spec, fold_spec), folds.k)
    encoders = []
    for fold in wanted:
        result, encoder = pretrain_fold(cfg, fold, folds)
        seen = "every image" if fold is None else f"the images of every fold but fold{fold}"
        print(f"{arch}: pretrained on {result.train_images} images ({seen}; no labels read) for {result.epochs_run} "
              f"epoch(s): {encoder}")
        encoders.append(encoder)
    size = cfg.resolved_input_size
    for fold, encoder in zip(wanted, encoders):
        target = "all" if fold is None else f"fold{fold}"
        print(f"fine-tune from it: alldetect train {arch} {target} input_size={size} pretrained_path={encoder}"
              + ("  (it saw the scored people's images, without labels: transductive)" if fold is None else ""))
    return encoders
