"""`alldetect export RUN... [--format onnx,torchscript] [--out exports]`: a trained fold's model as a file that other
software runs without this repository, with the preprocessing it needs written beside it.

The exported graph takes what any image library can make: uint8 RGB images, N x S x S x 3, after the fixed steps
(centre crop, resize) that preprocessing.json spells out; normalisation and softmax are inside the graph, and it
returns the probabilities N x 2 (hem, all). Each export is checked: the exported model (onnxruntime for ONNX) must
reproduce PyTorch's probabilities on a random batch, or the command fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alldetect import __version__
from alldetect.atomic import replace_folder, temporary_folder
from alldetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from alldetect.engine.loop import logits_of
from alldetect.engine.rundir.files import RunDir, RunMeta
from alldetect.errors import UserError, short_list
from alldetect.options import EXPORT_FORMATS

log = logging.getLogger("alldetect")

FORMATS = dict(zip(EXPORT_FORMATS, ("model.onnx", "model.torchscript.pt"), strict=True))  # format -> file
EXPORT_FILES = {*FORMATS.values(), "preprocessing.json"}  # all an export folder holds
TOLERANCE = 1e-4  # largest difference in probability allowed between the export and PyTorch


class Exportable(nn.Module):
    """uint8 RGB N x S x S x 3 -> softmax probabilities N x 2 (hem, all), normalisation included."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return torch.softmax(logits_of(self.model(x)), dim=1)


def preprocessing(meta: RunMeta) -> dict:
    size, crop = meta.input_size, meta.crop
    return {
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", size, size, 3], "channels": "RGB"},
        "output": {"name": "probs", "dtype": "float32", "shape": ["N", 2], "classes": ["hem", "all"],
                   "meaning": "softmax probabilities; column 1 is p(all), the leukemic blast"},
        "steps": [
            "read the image as 8-bit RGB (OpenCV reads BGR: convert)",
            f"centre crop a square of side {crop} px (clamped to the image; 0 = the largest centred square)"
            if crop else "take the largest centred square",
            f"resize to {size} x {size}: cv2.INTER_AREA when shrinking, cv2.INTER_LINEAR when enlarging",
            "stack as N x S x S x 3 uint8; normalisation (ImageNet mean and std"
            + (", then each image's mean colour subtracted" if meta.config.subtract_mean else "")
            + ") and softmax are inside the model",
        ],
        "crop": crop, "input_size": size, "resize": {"shrink": "INTER_AREA", "enlarge": "INTER_LINEAR"},
        "threshold": 0.5, "arch": meta.config.arch,
    }


def export_folder(out: Path, run: Path, meta: RunMeta) -> Path:
    """Where a fold run's export goes: out/<arch>_<fold>."""
    return out / f"{meta.config.arch}_{run.name}"


def replace_problem(folder: Path, run: Path, overwrite: bool) -> str:
    """'' when `folder` may receive `run`'s export: absent, or an export of this run (or, with `overwrite`, of another
    run); never a folder that holds files export does not write."""
    if not (folder.exists() or folder.is_symlink()):
        return ""
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not an export folder; choose another --out"
    extra = sorted(set(os.listdir(folder)) - EXPORT_FILES)
    if extra:
        return (f"{folder} holds files `alldetect export` does not write ({short_list(extra, 4)}), which replacing "
                "it would remove; move them away or choose another --out")
    made_of = exported_run(folder)
    if made_of is not None and made_of == run.resolve():
        return ""
    if overwrite:
        return ""
    of = f"the export of {made_of}" if made_of is not None else "an export of unknown origin (no readable preprocessing.json)"
    return f"{folder} holds {of}, not of {run}: pass --overwrite to replace it, or choose another --out"


def exported_run(folder: Path) -> Path | None:
    """The run an export folder was made from (its preprocessing.json), or None when that cannot be read."""
    try:
        about = json.loads((folder / "preprocessing.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(about, dict):
        return None
    where = about.get("run_path") or about.get("run")
    return Path(where).resolve() if isinstance(where, str) and where else None


def export_run(run: Path, out: Path, formats: list[str], opset: int = 18, overwrite: bool = False) -> dict:
    """Export one fold run into out/<arch>_<fold>/, made whole in a temporary folder and swapped in (so the model
    files and preprocessing.json are always of one export); returns a summary row."""
    state = RunDir(run).load_best()
    meta, size = state.meta, state.meta.input_size
    wrapped = Exportable(state.network()).eval()
    folder = export_folder(out, run, meta)
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapped(example).numpy()
    if not np.isfinite(expected).all():
        raise UserError(f"{run}'s model gives NaN or infinite probabilities on a random batch: its best.pt holds "
                        "weights that overflow, so there is nothing to export. Retrain the run (overwrite=true)")
    row: dict[str, str | float] = {"run": str(run), "folder": str(folder)}
    tmp = temporary_folder(out, folder.name)
    try:
        for fmt in formats:
            path = tmp / FORMATS[fmt]
            (_onnx if fmt == "onnx" else _torchscript)(wrapped, example, path, opset)
            got = (_run_onnx if fmt == "onnx" else _run_torchscript)(path, example.numpy())
            diff = float(np.abs(got - expected).max())
            if not diff <= TOLERANCE:
                raise UserError(f"the {fmt} export of {run} gives other probabilities than PyTorch (largest "
                                f"difference {diff:.2g}), so it was not kept; please report it with the architecture")
            row[f"{fmt}_max_diff"] = diff
        about = {**preprocessing(meta), "files": {f: FORMATS[f] for f in formats}, "run": str(run),
                 "run_path": str(run.resolve()), "epoch": meta.progress.epoch, "select": meta.config.select,
                 "fold_file": meta.fold_file, "checkpoint_saved_at": meta.saved_at,
                 "made_by": f"alldetect {__version__}"}
        (tmp / "preprocessing.json").write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
        problem = replace_problem(folder, run, overwrite)  # again: another export may have arrived meanwhile
        if problem:
            raise UserError(problem)
        replace_folder(tmp, folder)
    except OSError as e:  # a full disk, a file-size limit: say what was kept
        kept = f"{folder} is kept as it was" if folder.exists() else "nothing was written there"
        raise UserError(f"could not write the export of {run} in {out} ({e.strerror or e}): {kept}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once swapped in
    return row


def _onnx(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, (example,), input_names=["images"], output_names=["probs"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    if program is None:
        raise UserError(f"torch's ONNX exporter returned nothing for {path.name}; try --format torchscript")
    program.save(str(path), external_data=False)


def _torchscript(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    traced.save(str(path))


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"images": images})[0]


def _run_torchscript(path: Path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path)).eval()
        return model(torch.from_numpy(images)).numpy()
