"""The report's words and numbers: table headers, each row's cells, the headline and notes,
shared by the markdown and the HTML page."""

from __future__ import annotations

import datetime

from ..units import duration
from .data import Rec


def fmt_delta(d: float | None) -> str:
    if d is None:
        return ""
    text = f"{abs(d):.0f}" if abs(d) >= 10 else f"{abs(d):.1f}"
    return f" ({'−' if d < 0 else '+'}{text}%)" if text.strip("0.") else ""  # unchanged: no delta


COUNT, BYTES = ("B", "M", "k", ""), (" GB", " MB", " kB", " B")


def _scaled(n: float | None, units: tuple[str, str, str, str], spec: str) -> str:
    if n is None:
        return "–"
    for div, unit in zip((1e9, 1e6, 1e3), units[:3], strict=True):
        if abs(n) >= div:
            return f"{n / div:{spec}}{unit}"
    return f"{n:.0f}{units[3]}"


def fmt_s(s: float | None) -> str:
    return duration(s, tenths=True, missing="–")


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def cells(r: Rec) -> list[str]:
    """One model row's cells: the markdown and html tables share them."""
    params = _scaled(r["params"], COUNT, ".2f") + fmt_delta(r["d_params_pct"])
    if r["nonzero_params"] is not None and r["nonzero_params"] < 0.99 * (r["params"] or 0):
        params += f", {_scaled(r['nonzero_params'], COUNT, '.2f')} nonzero"
    acc = r["accuracy"]
    return [r["label"], params,
            _scaled(r["size_bytes"], BYTES, ".1f") + fmt_delta(r["d_size_pct"]),
            fmt(r["perplexity"], ".2f") + fmt_delta(r["d_perplexity_pct"]),
            fmt(acc if acc is None or acc > 1 else acc * 100, ".1f", "%"),
            fmt(r["latency_ms"], ".2f", " ms") + fmt_delta(r["d_latency_pct"]) + noise(r, "latency_noise"),
            fmt(r["gen_latency_ms"], ".1f", " ms") + noise(r, "gen_latency_noise"), fmt(r["tokens_per_s"], ",.0f"),
            fmt_s(r["wall_s"]), "–" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}"]


#: The marker of a latency within the noise, and its footnote.
NOISE_MARK = " ~"
NOISE_NOTE = ("~ within noise: the latency differs from the baseline's by less than the interquartile range "
              "of the timed repeats (the larger of the two), so the difference is not measured.")


def noise(r: Rec, field: str) -> str:
    """`` ~`` where the row's latency is within the noise of the baseline's (``data.within_noise``)."""
    return NOISE_MARK if r.get(field) else ""


def task_headers(data: Rec) -> list[str]:
    """The task table's headers: the step, then one column per lm-eval task metric (``hellaswag acc_norm``)."""
    return ["Step", *(c.removeprefix("task:").replace(":", " ", 1) for c in data.get("task_columns") or [])]


def task_rows(data: Rec) -> list[list[str]]:
    """One row per model with task scores: its label, then each task metric as lm-eval gives it."""
    columns = data.get("task_columns") or []
    out = []
    for r in data["rows"]:
        scores = r.get("tasks") or {}
        if scores:
            out.append([str(r["label"]), *(fmt(scores.get(c), ".4g") for c in columns)])
    return out


HEADERS = ["Step", "Params", "Size", "Perplexity", "Accuracy", "Fwd latency", "Gen latency",
           "Train tok/s", "Wall", "Cost¹"]
TRIAL_HEADERS = ["Trial", "Params", "Value", "State"]
ATTEMPT_HEADERS = ["Attempt", "Status", "Duration", "$/h", "Nodes", "Spot", "$", "Ended because"]


COMPARE_HEADERS = ["Variant", "Recipe", "Size", "Perplexity", "Fwd latency", "Gen tok/s", "Wall", "Cost¹",
                   "Pareto front"]


def compare_rows(data: Rec) -> list[Rec]:
    return [r for r in data["rows"] if r.get("variant") is not None]


def compare_cells(r: Rec) -> list[str]:
    """One compare variant's cells (``★`` where it is on a Pareto front)."""
    on = r.get("on_front") or []
    return [str(r["variant"]) + (" ★" if on else ""), str(r.get("recipe") or ""),
            _scaled(r["size_bytes"], BYTES, ".1f") + fmt_delta(r["d_size_pct"]),
            fmt(r["perplexity"], ".2f") + fmt_delta(r["d_perplexity_pct"]),
            fmt(r["latency_ms"], ".2f", " ms") + fmt_delta(r["d_latency_pct"]) + noise(r, "latency_noise"),
            fmt(r.get("gen_tokens_per_s"), ",.0f"), fmt_s(r["wall_s"]),
            "–" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}", ", ".join(on) or "–"]


def compare_notes(data: Rec) -> list[str]:
    """The sentences under the compare table: which variants are on each Pareto front."""
    fronts = data.get("fronts") or {}
    out = [f"Pareto front, perplexity vs {label}: " + (", ".join(names) if names else "not measured") + "."
           for label, names in fronts.items()]
    return [*out, "★ on a front: no other variant is as good or better on both figures and better on one "
                  "(lower perplexity, smaller size or latency). Deltas are against the baseline."]


def trial_cells(t: Rec) -> list[str]:
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in t["params"].items())
    return [f"{t['number']}{' ★' if t['best'] else ''}", params, fmt(t["value"], ".4f"), t["state"]]


def attempt_cells(a: Rec) -> list[str]:
    status = a.get("ended_as") or a["status"] + (f" (exit {a['exit_code']})" if a["exit_code"] not in (None, 0)
                                                 else "")
    return [str(a["number"]), status, fmt_s(a["duration_s"]), f"{a['hourly_usd']:.2f}",
            str(a["nodes"]), "yes" if a["spot"] else "no", f"{a['usd']:.4f}", a.get("detail") or a["status"]]


def headline(data: Rec) -> str:
    """``demo: succeeded, $1.0400 spent (estimated $0.9000, +16%) — 2026-01-05 10:12 UTC on aws
    us-east-1 p4d.24xlarge (A100:8, spot)``: the outcome, the money against the plan, when and where."""
    why = f" ({data['reason']})" if data["reason"] and data["reason"] != data["status"] else ""
    text = f"{data['name']}: {data['status']}{why}, ${data['spent_usd']:.4f} spent"
    est = data.get("estimated_usd")
    if est is not None:
        # The estimate is this run's cost to complete: compare it with this run's spend.
        run = data.get("run_spent_usd", data["spent_usd"])
        off = f", {'+' if run >= est else '−'}{abs(run - est) / est * 100:.0f}%" if est > 0 else ""
        this = f"; this run ${run:.4f}" if abs(run - data["spent_usd"]) > 5e-5 else ""
        text += f" (estimated ${est:.4f}{off}{this})"
    when = f"{utc(data['date'])} UTC" if data.get("date") else None
    where = f"on {data['hardware']}" if data.get("hardware") else None
    tail = " ".join(x for x in (when, where) if x)
    return text + (f" — {tail}" if tail else "")


def utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def notes(data: Rec) -> list[str]:
    """The sentences under the model table."""
    out = []
    if data["rows"]:
        out += ["Deltas in parentheses are against the baseline (the model before the first step).",
                f"¹ {data['cost_note']}"]
        if any(r.get("latency_noise") or r.get("gen_latency_noise") for r in data["rows"]):
            out.append(NOISE_NOTE)
    if data["results_source"] is None:
        out.append("No results yet: the job wrote no results.json (it may have failed before its "
                   "first step finished). Attempts and spend are below.")
    elif data["results_source"] == "events":
        out.append("results.json is missing: the rows come from the steps' step_done events.")
    return out


# ---- markdown ------------------------------------------------------------------------------------
