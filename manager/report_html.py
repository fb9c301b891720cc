"""The report's plots (PNG, via matplotlib's Agg backend) and its self-contained HTML page.

matplotlib is imported inside the plotting functions only: the control plane does
not depend on it, and without it the report is written without plots.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from .report import (
    ATTEMPT_HEADERS,
    HEADERS,
    TRIAL_HEADERS,
    attempt_cells,
    cells,
    headline,
    notes,
    trial_cells,
)

Rec = dict[str, Any]
LOSS_PNG, TRADEOFF_PNG = "loss_curves.png", "tradeoff.png"
_DELTA = re.compile(r" \(([−+])([^)]*%)\)")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    # The object API with an Agg canvas: no pyplot, so no global state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_loss_curves(curves: dict[str, list[list[float]]], path: Path) -> Path | None:
    """One line per training-like step (x: its optimizer step, y: training loss)."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, (ax,) = _figure(7.5, 4.2)
    for key, points in curves.items():
        xs, ys = zip(*((p[0], p[1]) for p in points), strict=True)
        ax.plot(xs, ys, marker="." if len(points) < 30 else None, linewidth=1.4,
                label=key.replace("-", " ", 1))
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Loss by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    return path


def plot_tradeoff(rows: list[Rec], path: Path) -> Path | None:
    """Size on disk vs perplexity and forward latency vs perplexity, a labelled point per model."""
    panels = [("size_bytes", 1e6, "model size (MB)"), ("latency_ms", 1.0, "forward latency (ms)")]
    # An evaluate step measures the model before it again: one point per model, not per step.
    models = [r for r in rows if r.get("kind") != "evaluate"] or rows
    series = [[(r[key] / scale, r["perplexity"], r["label"]) for r in models
               if r.get(key) is not None and r.get("perplexity") is not None]
              for key, scale, _ in panels]
    if not any(series):
        return None
    fig, axes = _figure(10.5, 4.4, ncols=2)
    for ax, (_, _, xlabel), points in zip(axes, panels, series, strict=True):
        ax.set(xlabel=xlabel, ylabel="perplexity (log scale)", yscale="log")  # the untrained baseline is far above
        ax.grid(alpha=0.3, which="both")
        if not points:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, color="0.7", linestyle="--", linewidth=0.8, zorder=1)  # pipeline order
        ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", s=45, zorder=2)
        ax.margins(0.12)
        at: dict[tuple[float, float], list[str]] = {}  # an evaluate step repeats its input model
        for x, y, label in points:
            at.setdefault((x, y), []).append(label)
        for i, ((x, y), names) in enumerate(at.items()):
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -11),
                        fontsize=8)
    axes[0].set_title("Size vs perplexity")
    axes[1].set_title("Latency vs perplexity")
    fig.savefig(path, format="png")
    return path


def plot_all(data: Rec, out_dir: Path) -> dict[str, Path]:
    """Write the PNGs that have data; {title: path}. Empty without matplotlib; never raises."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    images: dict[str, Path] = {}
    plots = [
        ("Loss curves", LOSS_PNG, lambda p: plot_loss_curves(data["loss_curves"], p)),
        ("Size and latency vs perplexity", TRADEOFF_PNG, lambda p: plot_tradeoff(data["rows"], p)),
    ]
    for title, name, plot in plots:
        try:
            written = plot(out_dir / name)
        except Exception:  # a plot is a nicety: a bad value must not cost the report
            (out_dir / name).unlink(missing_ok=True)
            continue
        if written is not None:
            images[title] = written
        else:  # no data this time: drop a stale plot from an earlier report
            (out_dir / name).unlink(missing_ok=True)
    return images


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
img { max-width: 100%; display: block; margin: 1em 0; }
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


def _img(title: str, path: Path) -> str:
    try:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return ""
    alt = html.escape(title)
    return f'<h2>{alt}</h2><img alt="{alt}" src="data:image/png;base64,{b64}">'


def render_html(data: Rec, images: dict[str, Path]) -> str:
    """The whole report as one HTML page, the plots embedded as data URIs."""
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
    if data["hpo_trials"]:
        parts += ["<h2>HPO trials (★ best)</h2>",
                  _table(TRIAL_HEADERS, [trial_cells(t) for t in data["hpo_trials"]],
                         ["best" if t["best"] else "" for t in data["hpo_trials"]])]
    parts.append("<h2>Attempts</h2>")
    parts.append(_table(ATTEMPT_HEADERS, [attempt_cells(a) for a in data["attempts"]])
                 if data["attempts"] else "<p>No attempts were launched.</p>")
    parts += [_img(title, path) for title, path in images.items()]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(data['name'])} — optjob report</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
