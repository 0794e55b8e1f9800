"""`alldetect export RUN...`: fold models as ONNX or TorchScript with their preprocessing (how: alldetect.export)."""

from __future__ import annotations

import logging
from pathlib import Path

from alldetect.atomic import check_writable
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import find_fold_runs
from alldetect.errors import UserError
from alldetect.export import FORMATS, export_folder, export_run, replace_problem

log = logging.getLogger("alldetect")


def parse_formats(spec: str) -> list[str]:
    formats = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {spec!r}: choose from {', '.join(FORMATS)} (comma-separated, e.g. onnx,torchscript)")
    return formats


def export_command(runs: list[str], out: str = "exports", formats: str = "onnx", overwrite: bool = False) -> list[dict]:
    """Export fold runs into <out>/<arch>_<fold>/. Every checkpoint and every folder it would replace is checked
    before anything is written: an export of another run is replaced only with `overwrite`, a folder holding other
    files never."""
    chosen = parse_formats(formats)
    fold_runs = find_fold_runs(runs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose a folder for the exports (default exports)")
    folders: dict[Path, Path] = {}
    for run in fold_runs:  # every checkpoint is checked before anything is written
        state = RunDir(run).load_best(mmap=True)
        state.network()
        folder = export_folder(out_dir, run, state.meta)
        if folder in folders:
            raise UserError(f"{folders[folder]} and {run} would both be exported to {folder}: export them one at a "
                            "time, each with its own --out")
        folders[folder] = run
    check_writable(out_dir, "the export folder (--out)")
    problems = [p for folder, run in folders.items() if (p := replace_problem(folder, run, overwrite))]
    if problems:
        raise UserError("; ".join(problems))
    rows = []
    for run in fold_runs:
        log.info("exporting %s as %s", run, ", ".join(chosen))
        rows.append(export_run(run, out_dir, chosen, overwrite=overwrite))
        diffs = ", ".join(f"{f} reproduces PyTorch to {rows[-1][f'{f}_max_diff']:.1e}" for f in chosen)
        print(f"{run} -> {rows[-1]['folder']}/ ({diffs})", flush=True)
    print("Each folder holds the model file(s) and preprocessing.json (input, crop, resize, output); see the "
          "README's Export section for running it with onnxruntime alone.")
    return rows
