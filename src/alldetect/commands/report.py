"""`alldetect report`: the comparison page of every run under runs/ (what it holds: alldetect.report)."""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from alldetect import __version__
from alldetect.atomic import check_writable, safe_name
from alldetect.comparison import comparison_table, display_table
from alldetect.findings import collect
from alldetect.page import to_html, to_markdown
from alldetect.report import build_page, check_data, draw_figures, measure_speeds, protocol_text, publish


def report_command(runs: str = "runs", submissions: str = "submissions", name: str | None = None,
                   out: str = "reports", data: str | None = None, device: str | None = "auto") -> dict:
    """Write reports/<name>/index.html, README.md and figures/. device=None skips the speed measurement."""
    start = time.perf_counter()
    findings = collect(Path(runs), Path(submissions))
    name = safe_name(name or "+".join(a.name for a in findings.archs if a.oof is not None))
    final = check_writable(out, "the reports folder (--out)") / name
    notes = check_data(findings, data)
    speed_note = measure_speeds(findings, device)
    numbers = comparison_table(findings)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        figures = draw_figures(findings, tmp / "figures", data)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        context = [*notes, f"Made by alldetect {__version__} on {stamp} from the runs in `{runs}`"
                   + (f" and the ensembles in `{submissions}`." if findings.ensembles else ".")]
        page = build_page(f"alldetect report: {name}", findings, numbers, figures, context, speed_note)
        (tmp / "index.html").write_text(to_html(page), encoding="utf-8")
        (tmp / "README.md").write_text(to_markdown(page), encoding="utf-8")
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    shown = display_table(numbers)
    print(f"{protocol_text(findings)}\n{shown.to_string(index=False)}")
    n_fig = sum(len(v) for v in figures.values())
    print(f"wrote {final / 'index.html'} and {final / 'README.md'} ({n_fig} figures) in {seconds:.1f} s"
          + (f"; {len(findings.missing)} item(s) missing or left out (listed on the page)" if findings.missing else ""))
    return {"folder": final, "numbers": numbers, "missing": findings.missing, "figures": figures, "seconds": seconds}
