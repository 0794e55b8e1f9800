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


def per_subject_table(scores: dict[str, dict], frame: pd.DataFrame) -> pd.DataFrame | None:
    if "subject" not in frame or "label" not in frame:
        return None
    g = frame.groupby("subject")
    table = pd.DataFrame({"class": g["label"].agg(lambda s: "all" if s.mean() >= 0.5 else "hem"), "images": g.size()})
    for name, s in scores.items():
        table[name] = pd.Series(s["per_subject_accuracy"]).round(3)
    return table.sort_index(key=lambda idx: idx.map(_subject_key))


def _subject_key(subject: str):
    """'H2' before 'H10', ALL subjects (bare numbers) before healthy ones ('H...')."""
    m = re.fullmatch(r"([A-Za-z]*)(\d+)", str(subject))
    return (m.group(1), int(m.group(2)), "") if m else ("~", 0, str(subject))


def render(title: str, scores: dict[str, dict], frame: pd.DataFrame) -> str:
    lines = [title, metrics_table(scores).to_string(index=False),
             "f1 = weighted F1 (the challenge metric); precision and recall of `all`; "
             "confusion = [[hem->hem, hem->all], [all->hem, all->all]] (rows true, columns predicted)"]
    subjects = per_subject_table(scores, frame)
    if subjects is not None:
        lines += ["", "per-subject accuracy (share of each subject's images classified correctly):",
                  subjects.reset_index().to_string(index=False)]
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
