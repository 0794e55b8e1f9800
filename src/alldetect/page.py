"""One report, two renderings: a self-contained HTML page and the same content as Markdown.

A page is a list of blocks (headings, paragraphs, lists, tables, figures). Figures are PNG files referenced
relative to the page, so the folder can be moved, zipped or opened from disk; no script, font or style sheet
is fetched from anywhere.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str  # plain text; `code` and **bold** spans are kept in both renderings


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Figure:
    src: str  # relative to the page
    caption: str
    width: int = 0  # CSS pixels in the HTML page; 0 = natural size, capped at the page width


@dataclass
class Page:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: .25em .45em; text-align: left; }
th { background: #f4f4f4; }
.num { text-align: right; white-space: nowrap; }
caption { caption-side: bottom; text-align: left; font-size: .88em; color: #555; padding-top: .3em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


BOLD_RE = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans into <code> and **bold** into <strong> (the Markdown they are written in)."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else BOLD_RE.sub(r"<strong>\1</strong>", html.escape(p))
                   for i, p in enumerate(parts))


def to_html(page: Page) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(page.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{_inline_html(page.title)}</h1>"]
    for block in page.blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            out.append(_table_html(block))
        elif isinstance(block, Figure):
            # No loading="lazy": every figure loads with the page (printing, headless rendering, saving).
            width = f' width="{block.width}"' if block.width else ""
            out.append(f'<figure><img src="{html.escape(block.src)}" alt="{html.escape(block.caption)}"{width}>'
                       f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
        else:
            raise TypeError(f"unknown block {block!r}")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


NUMBER_RE = re.compile(r"^([-+<>]?[\d.,]+( ± [\d.]+)?|\?|-|not measured)$")


def numeric_columns(frame: pd.DataFrame) -> list[bool]:
    """Columns whose every cell is a number (or a mean ± std, or a placeholder): right-aligned."""
    return [bool(len(frame)) and all(NUMBER_RE.match(str(v)) for v in frame[c]) for c in frame.columns]


def _table_html(table: Table) -> str:
    frame = table.frame
    cls = [' class="num"' if n else "" for n in numeric_columns(frame)]
    head = "".join(f"<th{k}>{html.escape(str(c))}</th>" for c, k in zip(frame.columns, cls))
    rows = "".join("<tr>" + "".join(f"<td{k}>{_inline_html(str(v))}</td>" for v, k in zip(row, cls)) + "</tr>"
                   for row in frame.itertuples(index=False))
    caption = f"<caption>{_inline_html(table.caption)}</caption>" if table.caption else ""
    return f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _cell_md(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, text left-aligned)."""
    head = "| " + " | ".join(_cell_md(c) for c in frame.columns) + " |"
    align = "|" + "|".join("---:" if n else ":---" for n in numeric_columns(frame)) + "|"
    rows = ["| " + " | ".join(_cell_md(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, align, *rows])


def to_markdown(page: Page) -> str:
    out = [f"# {page.title}", ""]
    for block in page.blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {i}" for i in block.items] + [""]
        elif isinstance(block, Table):
            out += [table_markdown(block.frame), ""]
            if block.caption:
                out += [block.caption, ""]
        elif isinstance(block, Figure):
            out += [f"![{block.caption}]({block.src})", "", f"*{block.caption}*", ""]
        else:
            raise TypeError(f"unknown block {block!r}")
    return "\n".join(out)
