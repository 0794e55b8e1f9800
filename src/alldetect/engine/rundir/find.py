"""Run folders named on the command line: `runs/<arch>/fold<k>` (one fold) or `runs/<arch>` (all its folds).
Folds of one architecture folder form one ensemble member."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alldetect.engine.rundir.files import RunDir
from alldetect.errors import UserError, short_list

FOLD_DIR_RE = re.compile(r"^fold(\d+)$")


@dataclass
class Member:
    """One ensemble member: the fold runs of one architecture folder, averaged with equal weight."""

    name: str
    folder: Path
    runs: list[Path]


def fold_dirs(folder: Path) -> list[Path]:
    """The fold<k> folders of an architecture folder, in numeric order (trained or not)."""
    dirs = [d for d in folder.iterdir() if d.is_dir() and FOLD_DIR_RE.match(d.name)]
    return sorted(dirs, key=fold_of)


def fold_of(run: Path) -> int:
    """runs/<arch>/fold3 -> 3 (a folder FOLD_DIR_RE has matched)."""
    m = FOLD_DIR_RE.match(run.name)
    assert m is not None, run
    return int(m.group(1))


def find_fold_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Every fold run under the given folders, each once, in the order given (folds in numeric order).
    A folder without a checkpoint is an error that names it."""
    if not paths:
        raise UserError("name at least one run folder, e.g. runs/proposed or runs/proposed/fold0")
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise UserError(f"run folder {path} does not exist; train it first (./train.sh ARCH FOLD) or check "
                            "the path (runs/<arch> or runs/<arch>/fold<k>)")
        if RunDir(path).trained:
            runs = [path]
        else:
            folds = fold_dirs(path)
            if not folds:
                full = path / "full"
                hint = (f": its final model is {full} (trained on every image), name it" if RunDir(full).trained
                        else "; name a trained run (runs/<arch>, runs/<arch>/fold<k> or runs/<arch>/full)")
                raise UserError(f"{path} holds no checkpoint (best.pt) and no fold<k> run folders{hint}")
            untrained = [d for d in folds if not RunDir(d).trained]
            if untrained:
                raise UserError(f"run folder(s) {short_list(map(str, untrained))} have no checkpoint (best.pt): "
                                "finish training them, or name only the fold folders that have one")
            runs = folds
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def group_members(runs: list[Path]) -> list[Member]:
    """Group fold runs by their architecture folder; a member is named after that folder (its path when two
    folders share a name)."""
    folders: dict[Path, list[Path]] = {}
    for run in runs:
        folders.setdefault(run.resolve().parent, []).append(run)
    names = [f.name for f in folders]
    members = []
    for folder, fold_runs in folders.items():
        shown = fold_runs[0].parent
        name = folder.name if names.count(folder.name) == 1 else str(shown)
        members.append(Member(name, shown, fold_runs))
    return members
