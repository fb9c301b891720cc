"""The comparison report: every step's output model side by side, with what it cost.

``report_data`` (``data.py``) assembles the data; ``write_report`` renders it as ``report.md``
(``markdown.py``), ``report.html`` (``page.py``) and SVG plots (``svg.py``) in the job folder.
"""

from __future__ import annotations

from pathlib import Path

from ..store import Store
from .data import report_data
from .markdown import render_markdown
from .page import render_html
from .pareto import plot_pareto
from .svg import plot_all

__all__ = ["report_data", "write_report"]


def write_report(store: Store, name: str) -> list[Path]:
    """Write report.md, report.html and the SVG plots into the job folder; return their paths."""
    data = report_data(store, name)
    job_dir = Path(data["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    images = {**plot_all(data, job_dir), **plot_pareto(data, job_dir)}
    md, html = job_dir / "report.md", job_dir / "report.html"
    md.write_text(render_markdown(data, images), encoding="utf-8")
    html.write_text(render_html(data, images), encoding="utf-8")
    return [md, html, *images.values()]
