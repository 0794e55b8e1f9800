"""`alldetect report`: the comparison page of every run under runs/ (what it holds: alldetect.report)."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from alldetect import __version__
from alldetect.atomic import check_writable, replace_folder, temporary_folder
from alldetect.errors import UserError
from alldetect.page import to_html, to_markdown
from alldetect.report.build import (
    build_page,
    check_data,
    draw_figures,
    measure_speeds,
    protocol_text,
    replaceable_problem,
    report_name,
)
from alldetect.report.comparison import comparison_table, display_table
from alldetect.report.findings import collect


def report_command(runs: str = "runs", submissions: str = "submissions", name: str | None = None,
                   out: str = "reports", data: str | None = None, device: str | None = "auto") -> dict:
    """Write reports/<name>/index.html, README.md and figures/. device=None skips the speed measurement.

    The folder is made whole in a temporary folder beside it and swapped in; it replaces only an earlier report
    (a folder of report's own files), never a user's folder or files."""
    start = time.perf_counter()
    findings = collect(Path(runs), Path(submissions))
    name = report_name(name, "+".join(a.name for a in findings.archs if a.oof is not None))
    final = check_writable(out, "the reports folder (--out)") / name
    _check_replaceable(final)
    notes = check_data(findings, data)
    speed_note = measure_speeds(findings, device)
    numbers = comparison_table(findings)
    tmp = temporary_folder(final.parent, name)
    try:
        figures = draw_figures(findings, tmp / "figures", data)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        context = [*notes, f"Made by alldetect {__version__} on {stamp} from the runs in `{runs}`"
                   + (f" and the ensembles in `{submissions}`." if findings.ensembles else ".")]
        page = build_page(f"alldetect report: {name}", findings, numbers, figures, context, speed_note)
        _write(tmp / "index.html", to_html(page))
        _write(tmp / "README.md", to_markdown(page))
        _check_replaceable(final)  # again: nothing of a user's may have arrived there meanwhile
        replace_folder(tmp, final)
    except OSError as e:  # a full disk, a file-size limit (ulimit -f): which file, and what is kept
        kept = (f"the earlier report {final} is kept as it was" if final.exists() else "no report was written")
        where = Path(e.filename).name if e.filename else "the report"
        raise UserError(f"could not write {where} of report {final} ({e.strerror or e}): {kept}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once swapped in
    seconds = time.perf_counter() - start
    shown = display_table(numbers)
    print(f"{protocol_text(findings)}\n{shown.to_string(index=False)}")
    n_fig = sum(len(v) for v in figures.values())
    print(f"wrote {final / 'index.html'} and {final / 'README.md'} ({n_fig} figures) in {seconds:.1f} s"
          + (f"; {len(findings.missing)} item(s) missing or left out (listed on the page)" if findings.missing else ""))
    return {"folder": final, "numbers": numbers, "missing": findings.missing, "figures": figures, "seconds": seconds}


def _check_replaceable(final: Path) -> None:
    problem = replaceable_problem(final)
    if problem:
        raise UserError(f"{problem}: report replaces only its own earlier output. Choose another --name (or --out), "
                        "or move that folder away")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:  # write() errors do not name the file
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
