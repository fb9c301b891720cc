"""``report.md``."""

from __future__ import annotations

from pathlib import Path

from .data import Rec
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


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers),
            *(f"| {' | '.join(r)} |" for r in esc), ""]


def render_markdown(data: Rec, images: dict[str, Path]) -> str:
    out = [f"# {headline(data)}", ""]
    if data["message"]:
        out += [*(f"> {line}" for line in str(data["message"]).splitlines()), ""]
    out += ["## Models", ""]
    if data["rows"]:
        out += _md_table(HEADERS, [cells(r) for r in data["rows"]])
    out += [line for n in notes(data) for line in (n, "")]
    if tasks := task_rows(data):
        out += ["## Tasks (lm-evaluation-harness)", "", *_md_table(task_headers(data), tasks)]
    if variants := compare_rows(data):
        out += ["## Compare", "", *_md_table(COMPARE_HEADERS, [compare_cells(r) for r in variants])]
        out += [line for n in compare_notes(data) for line in (n, "")]
    if data["hpo_trials"]:
        out += ["## HPO trials (★ best)", "",
                *_md_table(TRIAL_HEADERS, list(map(trial_cells, data["hpo_trials"])))]
    out += ["## Attempts", ""]
    attempts = list(map(attempt_cells, data["attempts"]))
    out += _md_table(ATTEMPT_HEADERS, attempts) if attempts else ["No attempts were launched.", ""]
    out += ["## Plots", ""] if images else []
    for title, p in images.items():
        out += [f"![{title}]({p.name})", ""]
    return "\n".join(out)
