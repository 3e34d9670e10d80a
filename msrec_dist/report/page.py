"""The report's sections → one self-contained HTML page (inline CSS; PNGs by relative path).

    Page: title, summary Table, comparison Section, one RunPart (label, path, Sections) per run
    Section: title, images (paths relative to report.html), tables, a note, or `missing`
             ("not available: ...") in place of its content

Every text is HTML-escaped (run labels and paths come from the file system).
"""
from __future__ import annotations

import datetime
import html
import os
from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Section:
    title: str
    images: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    note: str | None = None
    missing: str | None = None


@dataclass
class RunPart:
    label: str
    path: str
    sections: list[Section]


@dataclass
class Page:
    title: str
    summary: Table
    comparison: Section
    runs: list[RunPart]


STYLE = """
body { font-family: sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.missing { color: #a33; font-style: italic; } .note { color: #555; font-size: 0.9em; }
"""


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in table.rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def _section(section: Section, level: int) -> str:
    out = [f"<h{level}>{html.escape(section.title)}</h{level}>\n"]
    if section.missing:
        out.append(f'<p class="missing">{html.escape(section.missing)}</p>\n')
        return "".join(out)
    for src in section.images:
        out.append(f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(section.title, quote=True)}">\n')
    if section.note:
        out.append(f'<p class="note">{html.escape(section.note)}</p>\n')
    out.extend(_table(t) for t in section.tables)
    return "".join(out)


def render(page: Page) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(page.title)}</title>",
             f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(page.title)}</h1>\n",
             f'<p class="note">written {html.escape(when)} by python -m msrec_dist.report</p>\n',
             "<h2>Runs</h2>\n", _table(page.summary), _section(page.comparison, 2)]
    for run in page.runs:
        parts.append(f"<h2>Run {html.escape(run.label)}</h2>\n<p class=\"note\">{html.escape(run.path)}</p>\n")
        parts.extend(_section(s, 3) for s in run.sections)
    parts.append("</body></html>\n")
    return "".join(parts)


def write_page(page: Page, path: str) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(page))
    os.replace(tmp, path)
    return path
