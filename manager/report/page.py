"""``report.html``: the report as one self-contained page, the SVG plots inlined."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from .text import (
    ATTEMPT_HEADERS,
    COMPARE_HEADERS,
    HEADERS,
    TRIAL_HEADERS,
    attempt_cells,
    cells,
    compare_cells,
    compare_notes,
    compare_rows,
    headline,
    notes,
    task_headers,
    task_rows,
    trial_cells,
)

Rec = dict[str, Any]
_DELTA = re.compile(r" \(([−+])([^)]*%)\)")


# ---- html ----------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .7em; text-align: right;
         white-space: nowrap; }
th { background: #f5f5f7; } td:first-child, th:first-child { text-align: left; }
tr.baseline td { color: #555; font-style: italic; } tr.best td { background: #fff8d6; }
.better { color: #11813a; } .worse { color: #b3261e; }
.note { color: #555; font-size: .92em; } .status-failed, .status-stopped { color: #b3261e; }
.status-succeeded { color: #11813a; } blockquote { border-left: 3px solid #ccc; margin: 0;
       padding-left: 1em; color: #555; white-space: pre-wrap; }
.plot svg { max-width: 100%; height: auto; display: block; margin: 1em 0; }
"""


def _cell(text: str) -> str:
    # Every delta in the table is of a smaller-is-better metric (params, size, perplexity, latency).
    def span(m: re.Match[str]) -> str:
        cls = "better" if m.group(1) == "−" else "worse"
        return f' <span class="{cls}">({m.group(1)}{m.group(2)})</span>'

    return _DELTA.sub(span, html.escape(text))


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="{cls}">' + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
        for row, cls in zip(rows, classes or [""] * len(rows), strict=True)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plot(title: str, path: Path) -> str:
    try:  # the SVG text itself, which svg.py escaped: inline, so the page stays one file
        svg = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ""
    return f'<h2>{html.escape(title)}</h2><div class="plot">{svg}</div>'


def render_html(data: Rec, images: dict[str, Path]) -> str:
    """The whole report as one HTML page, the SVG plots inline."""
    status = html.escape(str(data["status"]))
    parts = [f"<h1>{html.escape(headline(data))}</h1>",
             f'<p>Status: <b class="status-{status}">{status}</b> · run {data["run"] or "–"} · '
             f"job folder <code>{html.escape(data['job_dir'])}</code></p>"]
    if data.get("message"):
        parts.append(f"<blockquote>{html.escape(str(data['message']))}</blockquote>")
    parts.append("<h2>Models</h2>")
    if data["rows"]:
        parts.append(_table(HEADERS, [cells(r) for r in data["rows"]],
                            ["baseline" if r["kind"] == "baseline" else "" for r in data["rows"]]))
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes(data)]
    if tasks := task_rows(data):
        parts += ["<h2>Tasks (lm-evaluation-harness)</h2>", _table(task_headers(data), tasks)]
    if variants := compare_rows(data):
        parts += ["<h2>Compare</h2>", _table(COMPARE_HEADERS, [compare_cells(r) for r in variants],
                                             ["best" if r.get("on_front") else "" for r in variants])]
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in compare_notes(data)]
    if data["hpo_trials"]:
        parts += ["<h2>HPO trials (★ best)</h2>",
                  _table(TRIAL_HEADERS, [trial_cells(t) for t in data["hpo_trials"]],
                         ["best" if t["best"] else "" for t in data["hpo_trials"]])]
    parts.append("<h2>Attempts</h2>")
    parts.append(_table(ATTEMPT_HEADERS, [attempt_cells(a) for a in data["attempts"]])
                 if data["attempts"] else "<p>No attempts were launched.</p>")
    parts += [_plot(title, path) for title, path in images.items()]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(data['name'])} — optjob report</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
