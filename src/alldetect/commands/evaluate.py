"""`alldetect evaluate SUBMISSION.csv --labels LABELS.csv`: score a submission against a C-NMC labels file
with the same metrics as `ensemble`."""

from __future__ import annotations

from pathlib import Path

from alldetect.data.layouts import read_labels_file
from alldetect.engine.rundir.files import read_checked_csv
from alldetect.ensemble.record import read_ensemble_record
from alldetect.errors import UserError, short_list
from alldetect.metrics import score
from alldetect.render import render, write_json


def evaluate_command(submission: str, labels_file: str) -> dict:
    path = Path(submission)
    if not path.is_file():
        raise UserError(f"submission {path} does not exist; make one with `alldetect ensemble RUN... --name NAME`")
    sub = read_checked_csv(path, {"image", "prob_all", "label"}, "submission")
    if not sub["label"].isin([0, 1]).all():
        bad = sub.loc[~sub["label"].isin([0, 1]), "image"].tolist()
        raise UserError(f"submission {path}: the label column must be 0 (hem) or 1 (all); rows {short_list(bad)} are not")
    truth = read_labels_file(labels_file)
    names = sub["image"].map(lambda p: Path(p).name)
    if names.duplicated().any():
        raise UserError(f"submission {path} lists {short_list(names[names.duplicated()].tolist())} more than once")
    unknown = sorted(set(names) - set(truth["new_names"]))
    lacking = sorted(set(truth["new_names"]) - set(names))
    if unknown or lacking:
        raise UserError(
            f"labels file {labels_file} does not match the images of {path}: {len(unknown)} submitted image(s) have no "
            f"label ({short_list(unknown)}) and {len(lacking)} labelled image(s) are not in the submission "
            f"({short_list(lacking)}). Use the labels file of the folder that was predicted")
    truth = truth.set_index("new_names").loc[names.to_numpy()]
    labels, subjects = truth["label"].to_numpy(), truth["subject"].to_numpy()
    thresholds = _recorded_thresholds(path)
    scores = {}
    for column in [c for c in sub.columns if c.startswith("prob_") and c != "prob_all"]:
        member = column[len("prob_"):]
        t = thresholds.get(member, 0.5)
        scores[member] = {**score(labels, sub[column], t, subjects=subjects), "threshold": t}
    scores["submission"] = {**score(labels, sub["prob_all"], pred=sub["label"], subjects=subjects),
                            "threshold": "label column"}
    print(render(f"{path} against {labels_file} ({len(sub)} images); the submission's own labels decide",
                 scores, truth.reset_index(drop=True).assign(label=labels, subject=subjects)))
    result = {"submission": str(path), "labels_file": str(labels_file), "images": len(sub), "scores": scores}
    out = path.with_suffix("") / "evaluation.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


def _recorded_thresholds(submission: Path) -> dict[str, float]:
    """Each member's threshold as `ensemble` recorded it beside the submission. A submission without that record
    (written by other means) has its members scored at 0.5, said in the output; a record that cannot be read is
    an error, never a silent 0.5."""
    record = submission.with_suffix("") / "ensemble.json"
    if not record.exists():
        print(f"no {record} beside the submission: each member is scored at threshold 0.5")
        return {}
    remedy = ("the members' thresholds are unknown: remake it with the same `alldetect ensemble ... --name NAME`, or "
              "move it away to score every member at 0.5")
    thresholds = read_ensemble_record(record, remedy).member_thresholds
    if thresholds is None:
        raise UserError(f"{record} records no member thresholds (it is not of `ensemble --name`); {remedy}")
    return thresholds
