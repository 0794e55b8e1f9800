"""What `alldetect ensemble` records beside its outputs, typed and versioned (alldetect.records):

  submissions/oof_<NAME>/metrics.json   --oof: members, how they were combined, cross-fitted scores, alternatives
  submissions/<NAME>/ensemble.json      --name: members, how they were combined, each member's threshold
  submissions/<NAME>/metrics.json       --name on labelled images: the same, with the held-out scores

The report and `evaluate` read them back through `read_ensemble_record`, which refuses a damaged, foreign or newer
file with an error that says to remake it, never a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from alldetect.records import read_record

ENSEMBLE_VERSION = 1


class EnsembleRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = ENSEMBLE_VERSION
    mode: Literal["oof", "held-out"]
    members: list[str]
    method: str  # in words, e.g. "weights=oof, threshold=0.5"
    weights_mode: str
    threshold_mode: str
    weights: dict[str, float]
    threshold: float
    weights_note: str | None = None
    images: int
    made_by: str = ""
    runs: dict[str, list[str]] = {}
    scores: dict[str, dict[str, Any]] = {}  # name -> score() of the member or ensemble (labelled images only)
    persons: list[dict[str, Any]] | None = None  # per person: mean probability, share called `all`
    transductive: str | None = None  # correct=knn: each image's probability depends on the others
    prior: dict[str, Any] | None = None  # prior=: the training mix and the estimated (or given) one
    # --oof
    cross_fitted: bool | None = None
    per_fold: dict[int, dict[str, Any]] | None = None  # what was fitted on the other folds, per scored fold
    alternatives: dict[str, dict[str, Any]] | None = None  # the ensemble made other ways, scored alike
    fold_file: str | None = None
    fold_fingerprint: str | None = None
    selection: dict[str, str] | None = None  # per member: how its runs chose their weights (select=)
    # --name
    name: str | None = None
    member_thresholds: dict[str, float] | None = None
    knn: dict[str, dict[str, Any]] | None = None
    temperature: float | None = None
    prior_transductive: str | None = None
    data_root: str | None = None
    data_roots: list[str] | None = None
    data_fingerprint: str | None = None
    data_content: str | None = None
    layout: str | None = None
    tta: Any = None


def check_record(record: dict) -> dict:
    """The record as written: `record` with its version, checked against the model (a key the model does not
    know is a bug here, caught by the tests, not a file a reader later refuses)."""
    written = {"version": ENSEMBLE_VERSION, **record}
    EnsembleRecord.model_validate(written)
    return written


def read_ensemble_record(path: Path, remedy: str) -> EnsembleRecord:
    return read_record(path, EnsembleRecord, ENSEMBLE_VERSION, "a record `alldetect ensemble` writes", remedy)
