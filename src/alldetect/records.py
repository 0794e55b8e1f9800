"""JSON files alldetect writes and reads back, each a pydantic model with a `version`.

A reader gets the model or a UserError that names the file, what is wrong and what to do: a damaged file, one
that is not the record it should be (an unknown key, a wrong type), or one written by a newer alldetect is never
read as defaults. A file from before versions were recorded reads as version 1 (the fields were the same).

  pred_<NAME>.json        engine/rundir/files.PredictionRecord   (RunDir.read_pred_meta)
  <fold file>.json        data/folds.FoldSidecar             (load_fold_file)
  metrics.json, ensemble.json of `ensemble`   ensemble/record.EnsembleRecord   (report, evaluate)
  last.pt's half-done epoch                   engine/rundir/files.PartialEpoch     (inside the checkpoint's RunMeta)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from alldetect.errors import UserError

Record = TypeVar("Record", bound=BaseModel)


def read_record(path: Path, model: type[Record], version: int, what: str, remedy: str) -> Record:
    """The record in `path` (`what`: e.g. "the record `alldetect predict` writes"; `remedy`: what to do)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {remedy}") from None
    return parse_record(raw, path, model, version, what, remedy)


def parse_record(raw: object, path: Path, model: type[Record], version: int, what: str, remedy: str) -> Record:
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {type(raw).__name__}, not {what}; {remedy}")
    found = raw.get("version", 1)  # before versions were recorded: the same fields as version 1
    if not isinstance(found, int) or isinstance(found, bool) or found > version:
        raise UserError(f"{path} is a version {found} record, written by a newer alldetect than this one (which "
                        f"reads up to version {version}): upgrade alldetect, or {remedy}")
    try:
        return model.model_validate({**raw, "version": found})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the record"
        raise UserError(f"{path} is not {what}: {where}: {first['msg']}; {remedy}") from None
