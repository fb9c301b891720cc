"""The Pareto front of a ``compare`` step's variants: quality (perplexity, lower is better) against
size and against latency (lower is better), and its plot (``pareto_svg``).

A variant is on the front when no other variant is at least as good on both axes and better on one.
Equal points dominate nothing of each other, so tied variants are on the front (or off it) together;
a variant missing either figure is left out of that front."""

from __future__ import annotations

import contextlib
import itertools
import math
from html import escape
from pathlib import Path
from typing import Any

from .svg import INK, LEFT, MUTED, RIGHT, TOP, Scale, _axes, _open, _text, domain, fmt, log_ticks, nice_ticks

Rec = dict[str, Any]
#: (row field of the x axis, how the text names the front, x axis label, divide x by).
FRONTS = (("size_bytes", "size", "model size (MB)", 1e6), ("latency_ms", "latency", "forward latency (ms)", 1.0))
QUALITY = "perplexity"
FRONT_COLOUR, OFF_COLOUR = "#d62728", "#9a9a9a"


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def pareto_front(points: list[tuple[str, Any, Any]]) -> list[str]:
    """Names of the points ``(name, x, y)`` no other point dominates (lower x and y are better), in
    the order given. Points with a missing or non-finite coordinate are not candidates."""
    valid = [(n, fx, fy) for n, x, y in points if (fx := _finite(x)) is not None and (fy := _finite(y)) is not None]
    return [n for n, x, y in valid
            if not any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in valid)]


def fronts(rows: list[Rec]) -> dict[str, list[str]]:
    """{"size": [variants on the perplexity-vs-size front], "latency": [...]} of the variant rows."""
    variants = [r for r in rows if r.get("variant") is not None]
    return {label: pareto_front([(r["variant"], r.get(key), r.get(QUALITY)) for r in variants])
            for key, label, _, _ in FRONTS}


def pareto_svg(rows: list[Rec], front: dict[str, list[str]]) -> str | None:
    """Two panels (perplexity against size, against latency), a point per variant, the front's points
    red and joined by its staircase, the others grey; None without two measured variants."""
    variants = [r for r in rows if r.get("variant") is not None]
    panels = []
    for key, label, xlabel, scale in FRONTS:
        pts = [(x / scale, y, str(r["variant"])) for r in variants
               if (x := _finite(r.get(key))) is not None and (y := _finite(r.get(QUALITY))) is not None and y > 0]
        panels.append((label, xlabel, pts))
    if not any(len(p[2]) >= 2 for p in panels):
        return None
    width, height, panel, bottom = 1040, 430, 520, 50
    out = _open(width, height, PARETO_TITLE)
    for k, (label, xlabel, pts) in enumerate(panels):
        box = (k * panel + LEFT, TOP, (k + 1) * panel - RIGHT, height - bottom)
        title = f"Perplexity vs {label}: Pareto front in red"
        out.append(f'<g class="panel" data-front="{escape(label)}">')
        if not pts:
            _axes(out, box, [], [], xlabel, "perplexity (log scale)", title)
            out += [_text((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, "not measured", 13, "middle", MUTED), "</g>"]
            continue
        xd, yd = domain([p[0] for p in pts], 0.12), domain([p[1] for p in pts], 0.12, log=True)
        sx, sy = Scale(*xd, box[0], box[2]), Scale(*yd, box[3], box[1], log=True)
        _axes(out, box, [(sx(t), fmt(t)) for t in nice_ticks(*xd)], [(sy(t), fmt(t)) for t in log_ticks(*yd)],
              xlabel, "perplexity (log scale)", title)
        on = set(front.get(label, []))
        stairs = sorted((x, y) for x, y, n in pts if n in on)
        if len(stairs) > 1:  # the front as a staircase: what the best quality at each size costs
            path = [f"{sx(stairs[0][0]):.1f},{sy(stairs[0][1]):.1f}"]
            for (_, y0), (x1, y1) in itertools.pairwise(stairs):
                path += [f"{sx(x1):.1f},{sy(y0):.1f}", f"{sx(x1):.1f},{sy(y1):.1f}"]
            out.append(f'<polyline class="front" points="{" ".join(path)}" fill="none" stroke="{FRONT_COLOUR}" '
                       'stroke-width="1.5" stroke-dasharray="5 3"/>')
        for i, (x, y, name) in enumerate(pts):
            mark = name in on
            fill = FRONT_COLOUR if mark else "white"
            stroke = FRONT_COLOUR if mark else OFF_COLOUR
            tip = f"{name}: {fmt(x, 4)}, perplexity {y:.2f}" + (" (on the Pareto front)" if mark else "")
            out.append(f'<circle class="{"on-front" if mark else "off-front"}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
                       f'r="{6 if mark else 5}" fill="{fill}" stroke="{stroke}" stroke-width="1.6">'
                       f"<title>{escape(tip)}</title></circle>")
            px, py = sx(x), sy(y) + (-8 if i % 2 else 16)
            flip = px > box[0] + 0.7 * (box[2] - box[0])
            out.append(_text(px - 8 if flip else px + 8, py, name + (" ★" if mark else ""), 10,
                             "end" if flip else "start", INK if mark else MUTED, ' class="label"'))
        out.append("</g>")
    return "\n".join([*out, "</svg>"]) + "\n"


PARETO_SVG = "pareto.svg"
PARETO_TITLE = "Compare: Pareto front of perplexity against size and latency"


def plot_pareto(data: Rec, out_dir: Path) -> dict[str, Path]:
    """Write ``pareto.svg`` when the report has compare variants; {title: path}. Never raises."""
    path = out_dir / PARETO_SVG
    try:
        svg = pareto_svg(data["rows"], data.get("fronts") or {}) if data.get("fronts") is not None else None
        if svg is not None:
            path.write_text(svg, encoding="utf-8")
            return {PARETO_TITLE: path}
    except Exception:  # a plot is a nicety: a bad value must not cost the report
        pass
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    return {}
