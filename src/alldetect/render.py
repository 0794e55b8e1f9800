"""Scores as text and files: the metrics table, per-subject accuracy, and JSON with numpy values made plain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect.atomic import write_text
from alldetect.metrics import METRIC_NAMES


def metrics_table(scores: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, s in scores.items():
        t = s["threshold"]
        row = {"model": name, **{k: round(s[k], 4) for k in (*METRIC_NAMES, "ece")}}
        if "subject_accuracy" in s:
            row["subject_acc"] = round(s["subject_accuracy"], 4)
        row["threshold"] = f"{t:.3f}" if isinstance(t, float) else "per fold" if isinstance(t, dict) else str(t)
        row["confusion"] = str(s["confusion"]).replace(" ", "")
        if "selection" in s:
            row["select"] = s["selection"]
        rows.append(row)
    return pd.DataFrame(rows)


def per_subject_table(scores: dict[str, dict], frame: pd.DataFrame,
                      persons: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Each subject's share of images classified correctly by each model; with `persons` (metrics.per_person of
    one model, the ensemble), also that model's mean probability of `all`, share called `all` and WRONG where most
    of the person's images are called the other class, in its order (worst first)."""
    if "subject" not in frame or "label" not in frame:
        return None
    g = frame.groupby("subject")
    table = pd.DataFrame({"class": g["label"].agg(lambda s: "all" if s.mean() >= 0.5 else "hem"), "images": g.size()})
    for name, s in scores.items():
        table[name] = pd.Series(s["per_subject_accuracy"]).round(3)
    if persons is None:
        return table.sort_index(key=lambda idx: idx.map(_subject_key))
    table.index = table.index.astype(str)
    table = table.loc[persons.index]
    table["mean_p_all"] = persons["mean_prob_all"].round(3)
    table["called_all"] = persons["called_all"].round(3)
    table["as_a_whole"] = np.where(persons["wrong"], "WRONG", "right")
    return table


def _subject_key(subject: str):
    """'H2' before 'H10', ALL subjects (bare numbers) before healthy ones ('H...')."""
    m = re.fullmatch(r"([A-Za-z]*)(\d+)", str(subject))
    return (m.group(1), int(m.group(2)), "") if m else ("~", 0, str(subject))


def render(title: str, scores: dict[str, dict], frame: pd.DataFrame, persons: pd.DataFrame | None = None,
           whose: str = "ensemble") -> str:
    """The metrics table and the per-subject table; with `persons` (metrics.per_person of the model `whose`), the
    latter is the per-person view, worst first."""
    lines = [title, metrics_table(scores).to_string(index=False),
             "f1 = weighted F1 (the challenge metric); precision and recall of `all`; "
             "confusion = [[hem->hem, hem->all], [all->hem, all->all]] (rows true, columns predicted)"]
    subjects = per_subject_table(scores, frame, persons)
    if subjects is not None:
        lines += ["", "per-subject accuracy (share of each subject's images classified correctly):"]
        if persons is not None:
            wrong = int(persons["wrong"].sum())
            lines[-1] = (f"per-subject accuracy, worst first (share of each subject's images classified correctly by "
                         f"each model; mean_p_all, called_all: the {whose}'s mean probability of `all` and share of "
                         f"the images called `all`; as_a_whole WRONG: most of the person's images called the other "
                         f"class, {wrong} of {len(persons)} people):")
        lines.append(subjects.reset_index().to_string(index=False))
    return "\n".join(lines)


def _plain(value):
    """JSON-safe: NaN becomes null, numpy numbers become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(_plain(data), indent=2) + "\n")
