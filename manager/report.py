"""The comparison report: every step's output model side by side, with what it cost.

``report_data`` assembles one JSON-serialisable dict from the state store and the
workload's ``results.json`` (read tolerantly: any key may be missing);
``write_report`` renders it as ``report.md``, ``report.html`` and two PNG plots
in the job folder. Neither raises for missing data: a job that failed before it
wrote results still gets a report of its attempts and spend.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from optjob.steps.layout import RESULTS_FILE

from . import paths
from .store import Store

#: Canonical metric name -> names the workload may use for it, first match wins.
ALIASES: dict[str, tuple[str, ...]] = {
    "params": ("params", "num_params", "n_params", "parameters"),
    "nonzero_params": ("nonzero_params", "nnz_params"),
    "size_bytes": ("size_bytes", "disk_bytes", "model_bytes", "size"),
    "perplexity": ("perplexity", "ppl", "eval_perplexity"),
    "accuracy": ("accuracy", "acc", "eval_accuracy"),
    "eval_loss": ("eval_loss",),
    "latency_ms": ("latency_ms", "forward_latency_ms", "fwd_latency_ms", "latency"),
    "gen_latency_ms": ("gen_latency_ms", "generate_latency_ms", "generation_latency_ms"),
    "tokens_per_s": ("tokens_per_s", "train_tokens_per_s"),
    "sparsity": ("sparsity",),
}
#: Row field -> the metric it compares against the baseline.
DELTAS = {"d_params_pct": "params", "d_size_pct": "size_bytes",
          "d_perplexity_pct": "perplexity", "d_latency_pct": "latency_ms"}
TRAINING_KINDS = ("train", "distill", "prune")
COST_NOTE = ("Cost splits this run's spend across steps in proportion to their wall time, "
             "so it includes provisioning and startup overhead.")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def pick(metrics: Any) -> dict[str, Any]:
    """The canonical metrics found in ``metrics`` (numbers only, plus ``method``)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    out: dict[str, Any] = {}
    for key, names in ALIASES.items():
        out[key] = next((v for n in names if (v := _num(metrics.get(n))) is not None), None)
    out["method"] = metrics.get("method") if isinstance(metrics.get("method"), str) else None
    return out


def pct(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return round((new - base) / abs(base) * 100.0, 4)


def _sort_key(v: Any) -> tuple[bool, float, str]:
    return (_num(v) is None, _num(v) or 0.0, str(v))


def _read_results(job_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((job_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _spec_steps(spec_json: str | None) -> list[tuple[str, dict[str, Any]]]:
    try:
        steps = json.loads(spec_json or "{}").get("steps") or []
        return [next(iter(s.items())) for s in steps if isinstance(s, dict) and s]
    except (ValueError, AttributeError, TypeError):
        return []


def _attempts(store: Store, name: str) -> list[dict[str, Any]]:
    out = []
    for a in store.attempts(name):
        end = a.ended_at if a.ended_at is not None else time.time()
        out.append({
            "number": a.number, "run": a.run, "status": a.status, "started_at": a.started_at,
            "ended_at": a.ended_at, "duration_s": max(0.0, end - a.started_at),
            "hourly_usd": a.hourly_usd, "nodes": a.nodes, "spot": bool(a.spot), "usd": store.spend(name, a.number),
            "exit_code": a.exit_code, "detail": a.detail,
        })
    return out


def _steps_from_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records from ``step_done`` events, for a run that has not written results.json."""
    by_index: dict[Any, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "step_done" and not e.get("skipped"):
            by_index[e.get("index")] = e
    return [by_index[k] for k in sorted(by_index, key=_sort_key)]


def _curves(steps: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    curves: dict[str, list[list[float]]] = {}
    for s in steps:
        extra = s.get("extra") if isinstance(s.get("extra"), dict) else {}
        points = [[float(p[0]), float(p[1])] for p in extra.get("loss_curve") or []
                  if isinstance(p, (list, tuple)) and len(p) >= 2 and _num(p[0]) is not None
                  and _num(p[1]) is not None]
        if points:
            curves[f"{s.get('index')}-{s.get('kind')}"] = points
    from_events: dict[str, dict[float, float]] = {}
    for e in events:  # a resumed attempt repeats steps: the later point wins
        step, loss = _num(e.get("step")), _num(e.get("loss"))
        if e.get("event") == "progress" and e.get("kind") in TRAINING_KINDS \
                and step is not None and loss is not None:
            from_events.setdefault(f"{e.get('index')}-{e.get('kind')}", {})[step] = loss
    for key, pts in from_events.items():
        curves.setdefault(key, [[k, pts[k]] for k in sorted(pts)])
    return curves


def _trials(steps: list[dict[str, Any]], events: list[dict[str, Any]],
            spec_steps: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    groups: dict[Any, dict[Any, dict[str, Any]]] = {}
    best_params: dict[Any, Any] = {}
    for e in events:  # the results file wins over events for the same trial number
        if e.get("event") == "trial":
            groups.setdefault(e.get("index"), {})[e.get("number")] = e
    for s in steps:
        extra = s.get("extra") if isinstance(s.get("extra"), dict) else {}
        for t in extra.get("trials") or []:
            if isinstance(t, dict):
                groups.setdefault(s.get("index"), {})[t.get("number")] = t
        if isinstance(extra.get("best_params"), dict):
            best_params[s.get("index")] = extra["best_params"]
    out = []
    for index, trials in groups.items():
        opts = spec_steps[index][1] if isinstance(index, int) and index < len(spec_steps) else {}
        direction = opts.get("direction") if isinstance(opts, dict) else None
        rows = [{"index": index, "number": t.get("number"), "params": t.get("params") or {},
                 "value": _num(t.get("value")), "state": str(t.get("state") or ""), "best": False}
                for _, t in sorted(trials.items(), key=lambda kv: _sort_key(kv[0]))]
        done = [r for r in rows if r["value"] is not None
                and r["state"].upper() in ("COMPLETE", "")]
        if done:
            pick_ = max if direction == "maximize" else min
            best = pick_(done, key=lambda r: r["value"])
            match = [r for r in done if r["params"] == best_params.get(index)]
            (match[0] if match else best)["best"] = True
        out.extend(rows)
    return out


def report_data(store: Store, name: str) -> dict[str, Any]:
    job = store.job(name)
    job_dir = Path(job.job_dir) if job else paths.job_dir(name)
    attempts = _attempts(store, name)
    run_numbers = {a["number"] for a in attempts if job is None or a["run"] == job.run}
    events = [e for _, e in store.events(name, kinds=("progress", "trial", "step_done"))
              if e.get("attempt") is None or e.get("attempt") in run_numbers]
    results = _read_results(job_dir)
    steps = [s for s in (results or {}).get("steps") or [] if isinstance(s, dict)]
    source = "results" if results is not None else None
    if not steps and (done := _steps_from_events(events)):
        steps, source = done, source or "events"
    baseline = pick((results or {}).get("baseline"))
    run_spend = sum(a["usd"] for a in attempts if a["number"] in run_numbers)
    total_wall = sum(_num(s.get("wall_s")) or 0.0 for s in steps)
    rows = [{"index": None, "kind": "baseline", "label": "baseline", "output": None, "wall_s": None,
             "cost_usd": None, **baseline, **dict.fromkeys(DELTAS), "metrics": {}}] if any(
        v is not None for k, v in baseline.items() if k != "method") else []
    for s in steps:
        m = pick(s.get("metrics"))
        wall = _num(s.get("wall_s"))
        label = f"{s.get('index')} {s.get('kind')}" + (f" ({m['method']})" if m["method"] else "")
        rows.append({
            "index": s.get("index"), "kind": s.get("kind"), "label": label,
            "output": s.get("output"), "wall_s": wall, **m,
            "cost_usd": run_spend * wall / total_wall if wall and total_wall > 0 else None,
            **{d: pct(m[k], baseline[k]) for d, k in DELTAS.items()},
            "metrics": s.get("metrics") if isinstance(s.get("metrics"), dict) else {},
        })
    return {
        "name": name, "status": job.status.value if job else "unknown",
        "reason": job.reason.value if job and job.reason else None,
        "message": job.message if job else None, "run": job.run if job else None,
        "job_dir": str(job_dir), "results_source": source,
        "spent_usd": store.spend(name), "run_spent_usd": run_spend, "attempts": attempts,
        "baseline": baseline, "rows": rows, "hpo_trials": _trials(steps, events, _spec_steps(
            job.spec_json if job else None)),
        "loss_curves": _curves(steps, events), "final": pick((results or {}).get("final")),
        "cost_note": COST_NOTE,
    }


# ---- markdown ------------------------------------------------------------------------------------

def fmt_delta(d: float | None) -> str:
    if d is None:
        return ""
    text = f"{abs(d):.0f}" if abs(d) >= 10 else f"{abs(d):.1f}"
    return f" ({'−' if d < 0 else '+'}{text}%)" if text.strip("0.") else " (±0%)"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f}s" if s < 60 else f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m" if s >= 3600 \
        else f"{int(s // 60)}m {int(s % 60):02d}s"


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def fmt_acc(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f}%" if v <= 1 else f"{v:.1f}%"


def cells(r: dict[str, Any]) -> list[str]:
    """One table row's cells, shared by the markdown and html renderers."""
    params = fmt_count(r["params"]) + fmt_delta(r.get("d_params_pct"))
    if r.get("nonzero_params") is not None and r["nonzero_params"] != r["params"]:
        params += f", {fmt_count(r['nonzero_params'])} nonzero"
    return [r["label"], params, fmt_bytes(r["size_bytes"]) + fmt_delta(r.get("d_size_pct")),
            fmt(r["perplexity"], ".2f") + fmt_delta(r.get("d_perplexity_pct")),
            fmt_acc(r["accuracy"]), fmt(r["latency_ms"], ".2f", " ms") + fmt_delta(r.get("d_latency_pct")),
            fmt(r["gen_latency_ms"], ".1f", " ms"), fmt(r["tokens_per_s"], ",.0f"),
            fmt_s(r["wall_s"]),
            "–" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}"]


HEADERS = ["Step", "Params", "Size", "Perplexity", "Accuracy", "Fwd latency", "Gen latency",
           "Train tok/s", "Wall", "Cost¹"]
TRIAL_HEADERS = ["Trial", "Params", "Value", "State"]
ATTEMPT_HEADERS = ["Attempt", "Status", "Duration", "$/h", "Nodes", "Spot", "$"]


def trial_cells(t: dict[str, Any]) -> list[str]:
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in t["params"].items())
    return [f"{t['number']}{' ★' if t['best'] else ''}", params, fmt(t["value"], ".4f"), t["state"]]


def attempt_cells(a: dict[str, Any]) -> list[str]:
    status = a["status"] + (f" (exit {a['exit_code']})" if a["exit_code"] not in (None, 0) else "")
    return [str(a["number"]), status, fmt_s(a["duration_s"]), f"{a['hourly_usd']:.2f}",
            str(a["nodes"]), "yes" if a["spot"] else "no", f"{a['usd']:.4f}"]


def headline(data: dict[str, Any]) -> str:
    why = f" ({data['reason']})" if data["reason"] and data["reason"] != data["status"] else ""
    return f"{data['name']}: {data['status']}{why}, ${data['spent_usd']:.4f} spent"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers),
            *(f"| {' | '.join(r)} |" for r in esc)]


def render_markdown(data: dict[str, Any], images: dict[str, Path]) -> str:
    out = [f"# {headline(data)}", ""]
    if data.get("message"):
        out += [f"> {data['message']}", ""]
    out += ["## Models", ""]
    if data["rows"]:
        out += [*_md_table(HEADERS, [cells(r) for r in data["rows"]]), "",
                "Deltas in parentheses are against the baseline (the model before the first step).",
                f"¹ {data['cost_note']}", ""]
    if data["results_source"] is None:
        out += ["No results yet: the job wrote no results.json (it may have failed before its "
                "first step finished). Attempts and spend are below.", ""]
    elif data["results_source"] == "events":
        out += ["results.json is missing; the rows come from the steps' step_done events.", ""]
    if data["hpo_trials"]:
        out += ["## HPO trials (★ best)", "",
                *_md_table(TRIAL_HEADERS, [trial_cells(t) for t in data["hpo_trials"]]), ""]
    out += ["## Attempts", ""]
    if data["attempts"]:
        out += [*_md_table(ATTEMPT_HEADERS, [attempt_cells(a) for a in data["attempts"]]), ""]
    else:
        out += ["No attempts were launched.", ""]
    for title, p in images.items():
        out += [f"![{title}]({p.name})", ""]
    return "\n".join(out)


def write_report(store: Store, name: str) -> list[Path]:
    """Write report.md, report.html and the PNG plots into the job folder; return their paths."""
    from .report_html import plot_all, render_html

    data = report_data(store, name)
    job_dir = Path(data["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    images = plot_all(data, job_dir)
    md, html = job_dir / "report.md", job_dir / "report.html"
    md.write_text(render_markdown(data, images), encoding="utf-8")
    html.write_text(render_html(data, images), encoding="utf-8")
    return [md, html, *images.values()]
