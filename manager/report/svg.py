"""The report's two charts as hand-written SVG files beside the report (``plot_all``):
linear and log scales, nice ticks, axes, grid, legend.

No third-party dependency and a few milliseconds a chart (matplotlib cost most of a second). Each
function returns one standalone ``<svg>`` document without an XML declaration, so the same text is a
valid .svg file and can be inlined in the HTML page. Every text that comes from the data is escaped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

Rec = dict[str, Any]
LOSS_SVG, TRADEOFF_SVG = "loss_curves.svg", "tradeoff.svg"
#: The matplotlib plots of reports written before 0.1: removed when a report is rewritten.
OLD_PLOTS = ("loss_curves.png", "tradeoff.png")
Tick = tuple[float, str]  # (pixel, label)
LINES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
VIRIDIS = ("#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#fde725")
INK, MUTED, GRID = "#222", "#555", "#e4e4e4"
LEFT, RIGHT, TOP, BOTTOM = 64, 18, 34, 50  # room for tick labels, axis labels and the title
PANELS = (("Size vs perplexity", "size_bytes", 1e6, "model size (MB)"),
          ("Latency vs perplexity", "latency_ms", 1.0, "forward latency (ms)"))


# ---- scales and ticks ----------------------------------------------------------------------------

def nice_step(span: float, target: int = 5) -> float:
    """The 1, 2 or 5 x 10^k step that cuts ``span`` into about ``target`` intervals."""
    raw = span / max(target, 1)
    k = math.floor(math.log10(raw))
    f = raw / 10.0**k
    m = 1 if f < 1.5 else 2 if f < 3 else 5 if f < 7 else 10
    return float(f"{m}e{k}")


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Multiples of a nice step inside [lo, hi] (a point range gets a small one around it)."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    digits = max(0, -math.floor(math.log10(step)))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(i * step, digits) + 0.0 for i in range(first, last + 1)]  # + 0.0: no "-0"


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decades inside [lo, hi] (lo > 0), with their 2x and 5x when it spans under two decades."""
    lo, hi = min(lo, hi), max(lo, hi)
    mults = (1, 2, 5) if math.log10(hi / lo) < 2 else (1,)
    ticks = [float(f"{m}e{k}") for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in mults]
    ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else [t for t in nice_ticks(lo, hi, 4) if t > 0]  # within one decade


def domain(values: Sequence[float], margin: float, log: bool = False) -> tuple[float, float]:
    """[min, max] of ``values`` widened by ``margin`` of its span each side (in log space when ``log``)."""
    f = math.log10 if log else float
    lo, hi = f(min(values)), f(max(values))
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):  # one value: a range around it
        pad = 0.15 if log else abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    lo, hi = lo - (hi - lo) * margin, hi + (hi - lo) * margin
    return (10.0**lo, 10.0**hi) if log else (lo, hi)


class Scale:
    """Maps [lo, hi] (its log10 when ``log``) onto pixels [a, b]; b < a for a y axis, which grows down."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False) -> None:
        self.log, self.a, self.b = log, a, b
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)

    def __call__(self, v: float) -> float:
        t = ((math.log10(v) if self.log else v) - self.lo) / (self.hi - self.lo)
        return self.a + t * (self.b - self.a)


def fmt(v: float, digits: int = 10) -> str:
    """A tick label: ticks are rounded already, so up to 10 significant digits show no float noise."""
    s = f"{v:.{digits}g}"
    if "e" in s:  # 1e+06 -> 1e6
        mant, exp = s.split("e")
        s = f"{mant}e{int(exp)}"
    return s


def ramp(t: float) -> str:
    """A viridis-like colour for t in [0, 1]: the fixed stops, interpolated."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = ([int(c[j:j + 2], 16) for j in (1, 3, 5)] for c in VIRIDIS[i:i + 2])
    return "#" + "".join(f"{round(p + (q - p) * (t - i)):02x}" for p, q in zip(a, b, strict=True))


# ---- drawing -------------------------------------------------------------------------------------

def _text(x: float, y: float, s: str, size: float = 11, anchor: str = "start", fill: str = INK,
          extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{extra}>'
            f"{escape(s)}</text>")


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, extra: str = "") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{extra}/>'


def _open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" font-family="system-ui, -apple-system, sans-serif">',
            f"<title>{escape(title)}</title>", f'<rect width="{width}" height="{height}" fill="white"/>']


def _axes(out: list[str], box: tuple[float, float, float, float], xticks: Sequence[Tick],
          yticks: Sequence[Tick], xlabel: str, ylabel: str, title: str) -> None:
    """Grid, tick labels, frame, axis labels and title around the plot area ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    out.append('<g class="axes">')
    for x, label in xticks:
        out += [_line(x, y0, x, y1, GRID), _line(x, y1, x, y1 + 4, MUTED), _text(x, y1 + 16, label, 10, "middle")]
    for y, label in yticks:
        out += [_line(x0, y, x1, y, GRID), _line(x0 - 4, y, x0, y, MUTED), _text(x0 - 7, y + 3.5, label, 10, "end")]
    out.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" fill="none" '
               f'stroke="{MUTED}"/>')
    cy = (y0 + y1) / 2
    out += [_text((x0 + x1) / 2, y1 + 38, xlabel, 12, "middle"),
            _text(x0 - 48, cy, ylabel, 12, "middle", extra=f' transform="rotate(-90 {x0 - 48:.1f} {cy:.1f})"'),
            _text((x0 + x1) / 2, y0 - 12, title, 14, "middle", extra=' font-weight="600"'), "</g>"]


def _legend(out: list[str], items: Sequence[tuple[str, str]], right: float, top: float) -> None:
    w, h = 42 + 6.3 * max(len(name) for name, _ in items), 8 + 17 * len(items)
    x, y = right - w - 8, top + 8
    out.append(f'<g class="legend"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h}" fill="white" '
               f'fill-opacity="0.85" stroke="#ccc" rx="3"/>')
    for i, (name, colour) in enumerate(items):
        ly = y + 13 + 17 * i
        out += [_line(x + 8, ly, x + 30, ly, colour, ' stroke-width="2"'), _text(x + 36, ly + 4, name, 11)]
    out.append("</g>")


# ---- the two plots -------------------------------------------------------------------------------

#: What a step's loss measures, by step kind: distillation's loss mixes a KL term on the teacher's
#: soft targets with cross-entropy (``alpha``), so it is not on the same scale as a train step's.
LOSS_AXES = {"distill": "distillation loss (α·KD + (1−α)·CE)"}
TRAINING_LOSS = "training loss"


def loss_svg(curves: dict[str, list[list[float]]]) -> str | None:
    """One line per training-like step (x: its optimizer step, y: its loss); None without data.
    Losses that measure different things (a train step's cross-entropy, a distillation's KD mix)
    get a panel each, side by side, never one shared axis."""
    series = {k: [(float(p[0]), float(p[1])) for p in v] for k, v in curves.items()}
    series = {k: [p for p in v if math.isfinite(p[0]) and math.isfinite(p[1])] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in series.items():
        kind = (key.split("-", 1)[1] if "-" in key else key).split(" ")[0]  # "1-distill (VARIANT)": distill
        groups.setdefault(LOSS_AXES.get(kind, TRAINING_LOSS), {})[key] = points
    panel, height = 760, 420
    width = panel * len(groups)
    out = _open(width, height, "Loss by step")
    colour = 0
    for k, (ylabel, members) in enumerate(groups.items()):
        box = (k * panel + LEFT, TOP, (k + 1) * panel - RIGHT, height - BOTTOM)
        title = "Loss by step" if len(groups) == 1 else ylabel[0].upper() + ylabel[1:].split(" (")[0] + " by step"
        out.append('<g class="panel">')
        _loss_panel(out, members, box, ylabel, title, colour)
        out.append("</g>")
        colour += len(members)
    return "\n".join([*out, "</svg>"]) + "\n"


def _loss_panel(out: list[str], series: dict[str, list[tuple[float, float]]], box: tuple[float, float, float, float],
                ylabel: str, title: str, colour: int) -> None:
    xd = domain([x for v in series.values() for x, _ in v], 0.05)
    yd = domain([y for v in series.values() for _, y in v], 0.05)
    sx, sy = Scale(*xd, box[0], box[2]), Scale(*yd, box[3], box[1])
    _axes(out, box, [(sx(t), fmt(t)) for t in nice_ticks(*xd, 6)], [(sy(t), fmt(t)) for t in nice_ticks(*yd)],
          "optimizer step", ylabel, title)
    legend = []
    for i, (key, points) in enumerate(series.items()):
        c, name = LINES[(colour + i) % len(LINES)], key.replace("-", " ", 1)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<g class="curve"><title>{escape(name)}</title><polyline points="{coords}" fill="none" '
                   f'stroke="{c}" stroke-width="1.5" stroke-linejoin="round"/>')
        if len(points) < 30:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in points]
        out.append("</g>")
        legend.append((name, c))
    _legend(out, legend, box[2], box[1])


def tradeoff_svg(rows: list[Rec]) -> str | None:
    """Size on disk vs perplexity and forward latency vs perplexity (log scale), a labelled point per model."""
    # An evaluate step measures the model before it again: one point per model, not per step.
    # Compare variants have their own plot (``pareto.py``): this one follows the pipeline up to compare.
    models = [r for r in rows if r.get("kind") not in ("evaluate", "variant")] or rows
    series = [[(float(r[key]) / scale, float(r["perplexity"]), str(r["label"])) for r in models
               if r.get(key) is not None and r.get("perplexity") is not None]
              for _, key, scale, _ in PANELS]
    series = [[p for p in s if math.isfinite(p[0]) and math.isfinite(p[1]) and p[1] > 0] for s in series]
    if not any(series):
        return None
    width, height, panel = 1040, 430, 520
    out = _open(width, height, "Size and latency vs perplexity")
    for k, ((title, _, _, xlabel), points) in enumerate(zip(PANELS, series, strict=True)):
        box = (k * panel + LEFT, TOP, (k + 1) * panel - RIGHT, height - BOTTOM)
        out.append('<g class="panel">')
        if not points:
            _axes(out, box, [], [], xlabel, "perplexity (log scale)", title)
            out += [_text((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, "not measured", 13, "middle", MUTED), "</g>"]
            continue
        xd, yd = domain([p[0] for p in points], 0.12), domain([p[1] for p in points], 0.12, log=True)
        sx, sy = Scale(*xd, box[0], box[2]), Scale(*yd, box[3], box[1], log=True)
        _axes(out, box, [(sx(t), fmt(t)) for t in nice_ticks(*xd)], [(sy(t), fmt(t)) for t in log_ticks(*yd)],
              xlabel, "perplexity (log scale)", title)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)  # pipeline order
        out.append(f'<polyline points="{coords}" fill="none" stroke="#b3b3b3" stroke-width="1" '
                   f'stroke-dasharray="4 3"/>')
        for i, (x, y, label) in enumerate(points):
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{ramp(i / max(len(points) - 1, 1))}" '
                       f'stroke="white" stroke-width="0.8"><title>{escape(f"{label}: {fmt(x, 4)}, perplexity {y:.2f}")}'
                       f"</title></circle>")
        at: dict[tuple[float, float], list[str]] = {}  # an evaluate step repeats its input model
        for x, y, label in points:
            at.setdefault((x, y), []).append(label)
        for i, ((x, y), names) in enumerate(at.items()):
            px, py = sx(x), sy(y) + (-7 if i % 2 else 15)  # alternate above and below
            flip = px > box[0] + 0.7 * (box[2] - box[0])  # near the right edge: the label goes left
            out.append(_text(px - 7 if flip else px + 7, py, " = ".join(names), 10, "end" if flip else "start",
                             extra=' class="label"'))
        out.append("</g>")
    return "\n".join([*out, "</svg>"]) + "\n"


def plot_all(data: Rec, out_dir: Path) -> dict[str, Path]:
    """Write the SVG plots that have data; {title: path}. Never raises."""
    for old in OLD_PLOTS:
        with contextlib.suppress(OSError):
            (out_dir / old).unlink(missing_ok=True)
    images: dict[str, Path] = {}
    plots: list[tuple[str, str, Callable[[], str | None]]] = [
        ("Loss curves", LOSS_SVG, lambda: loss_svg(data["loss_curves"])),
        ("Size and latency vs perplexity", TRADEOFF_SVG, lambda: tradeoff_svg(data["rows"])),
    ]
    for title, name, draw in plots:
        path = out_dir / name
        try:
            svg = draw()
            if svg is not None:
                path.write_text(svg, encoding="utf-8")
        except Exception:  # a plot is a nicety: a bad value must not cost the report
            svg = None
        if svg is not None:
            images[title] = path
        else:  # no data this time, or a failed plot: drop a stale one from an earlier report
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    return images
