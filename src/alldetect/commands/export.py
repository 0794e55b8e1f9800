"""`alldetect export RUN...`: fold models as ONNX or TorchScript with their preprocessing (how: alldetect.export)."""

from __future__ import annotations

import logging
from pathlib import Path

from alldetect.atomic import check_writable
from alldetect.engine.runfiles import RunDir
from alldetect.engine.runs import find_fold_runs
from alldetect.errors import UserError
from alldetect.export import FORMATS, export_run

log = logging.getLogger("alldetect")


def parse_formats(spec: str) -> list[str]:
    formats = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {spec!r}: choose from {', '.join(FORMATS)} (comma-separated, e.g. onnx,torchscript)")
    return formats


def export_command(runs: list[str], out: str = "exports", formats: str = "onnx") -> list[dict]:
    chosen = parse_formats(formats)
    fold_runs = find_fold_runs(runs)
    for run in fold_runs:  # every checkpoint is checked before anything is written
        RunDir(run).load_best(mmap=True).network()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable(out_dir, "--out")
    rows = []
    for run in fold_runs:
        log.info("exporting %s as %s", run, ", ".join(chosen))
        rows.append(export_run(run, out_dir, chosen))
        diffs = ", ".join(f"{f} reproduces PyTorch to {rows[-1][f'{f}_max_diff']:.1e}" for f in chosen)
        print(f"{run} -> {rows[-1]['folder']}/ ({diffs})", flush=True)
    print("Each folder holds the model file(s) and preprocessing.json (input, crop, resize, output); see the "
          "README's Export section for running it with onnxruntime alone.")
    return rows
