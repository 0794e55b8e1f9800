"""`alldetect ensemble RUN... --oof | --name NAME` (how members are combined and scored: alldetect.ensemble)."""

from __future__ import annotations

from pathlib import Path

from alldetect.atomic import check_writable, safe_name
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import FOLD_DIR_RE, Member, find_fold_runs, group_members
from alldetect.ensemble.core import OPTIONS, oof_report, submission
from alldetect.errors import UserError
from alldetect.options import parse_options, split_options


def ensemble_command(runs: list[str], oof: bool, name: str | None, overrides: list[str] | None = None,
                     out: str = "submissions") -> dict:
    paths, raw = split_options([*runs, *(overrides or [])])
    opts = parse_options(raw, OPTIONS, "ensemble")
    if not oof and not name:
        raise UserError("say what to combine: --oof (out-of-fold predictions) or --name NAME (the held-out "
                        "predictions `alldetect predict ... --name NAME` made)")
    if name:
        from alldetect.engine.predict import check_name

        check_name(name)
    members = group_members(find_fold_runs(paths))
    check_writable(out, "the output folder (--out)")
    if oof:
        label = name or "+".join(_member_label(m) for m in members)
        outcome = oof_report(members, opts, Path(out) / f"oof_{safe_name(label)}")
    else:
        assert name is not None  # checked above
        outcome = submission(members, name, opts, Path(out))
    print(outcome.text)
    return outcome.record


def _member_label(member: Member) -> str:
    """The member's name, with its folds when it is not all of its folder's (so that a result of single folds
    never replaces the full one): proposed, or proposed-fold0.2."""
    trained = find_fold_runs([member.folder]) if not RunDir(member.folder).trained else member.runs
    if {r.resolve() for r in member.runs} == {r.resolve() for r in trained}:
        return member.name
    folds = sorted(int(m.group(1)) for r in member.runs if (m := FOLD_DIR_RE.match(r.name)))
    return f"{member.name}-fold{'.'.join(map(str, folds))}"
