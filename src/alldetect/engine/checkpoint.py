"""Checkpoints: one dict with everything needed to resume a run or rebuild its model, written atomically
and read with `weights_only=True` so that a file can never run code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from alldetect.atomic import atomic_path
from alldetect.errors import UserError


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """mmap=True maps the weights instead of reading them: cheap when only the config and metadata are needed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train the run first (./train.sh ARCH FOLD)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is truncated or foreign
        raise UserError(f"cannot read checkpoint {path}: damaged or not a checkpoint (not a PyTorch archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refused to load {path}: it holds objects other than tensors and plain values, which could run code "
            f"when loaded ({str(e).splitlines()[0][:200]}). Only load checkpoints written by alldetect"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path} (damaged or not a checkpoint): {str(e)[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not an alldetect checkpoint (no model weights and config inside)")
    return state
