"""``report_data``: one JSON-serialisable dict from the state store and the workload's
``results.json`` (read tolerantly: any key may be missing). It never raises for missing data: a job
that failed before it wrote results still gets a report of its attempts and spend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from optjob.steps.exit_codes import EXIT_DEADLINE, EXIT_SIGNAL
from optjob.steps.layout import RESULTS_FILE

from .. import paths
from ..job_states import STOP_REQUESTED
from ..store import JobRow, Store
from .pareto import fronts

#: Canonical metric name -> names the workload may use for it (first match wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "params": ("params", "params_after", "student_params", "num_params", "n_params"),
    "nonzero_params": ("nonzero_params", "nnz_params"),
    "size_bytes": ("size_bytes", "size_bytes_after", "disk_bytes", "model_bytes", "size"),
    "perplexity": ("perplexity", "ppl", "eval_perplexity"),
    "accuracy": ("accuracy", "acc", "eval_accuracy"),
    "eval_loss": ("eval_loss",),
    "latency_ms": ("latency_ms", "forward_latency_ms", "fwd_latency_ms", "latency"),
    "gen_latency_ms": ("gen_latency_ms", "generate_latency_ms", "generation_latency_ms"),
    "latency_ms_iqr": ("latency_ms_iqr",),
    "gen_latency_ms_iqr": ("gen_latency_ms_iqr",),
    "tokens_per_s": ("tokens_per_s", "train_tokens_per_s"),
    "gen_tokens_per_s": ("gen_tokens_per_s",),
    "sparsity": ("sparsity",),
}
#: Row field -> the metric it compares against the baseline.
DELTAS = {"d_params_pct": "params", "d_size_pct": "size_bytes",
          "d_perplexity_pct": "perplexity", "d_latency_pct": "latency_ms"}
TRAINING_KINDS = ("train", "distill", "prune")
COST_NOTE = ("Cost splits every attempt's spend, interrupted ones included, across the steps it worked on "
             "in proportion to its time on each, so it includes provisioning and startup overhead; the column "
             "sums to what was spent.")
#: Events that mark where an attempt's time went.
MARKS = ("step_started", "step_done", "stopped", "job_done", "error")
Rec = dict[str, Any]


def _num(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None  # ints stay ints (params, bytes)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _dict(value: Any) -> Rec:
    return value if isinstance(value, dict) else {}


def _sort_key(v: Any) -> tuple[bool, float, str]:
    return (_num(v) is None, _num(v) or 0.0, str(v))


def pick(metrics: Any) -> Rec:
    """The canonical metrics found in ``metrics`` (numbers, or None), plus ``method``."""
    m = _dict(metrics)
    out: Rec = {k: next((v for n in names if (v := _num(m.get(n))) is not None), None)
                for k, names in ALIASES.items()}
    out["method"] = _method(m)
    return out


def _method(m: Rec) -> str | None:
    """The step's method, with its sparsity pattern (2:4) or bits and group size (gptq, rtn)."""
    method = m.get("method")
    if not isinstance(method, str):
        return None
    pattern, bits, group = m.get("pattern"), _num(m.get("bits")), _num(m.get("group_size"))
    if isinstance(pattern, str) and pattern != "unstructured":
        method += f" {pattern}"
    if bits is not None:
        method += f" int{bits}" + (f" g{group}" if group is not None else "")
    return method


#: Row field -> the latency whose difference from the baseline's it flags as within the noise.
NOISE = {"latency_noise": "latency_ms", "gen_latency_noise": "gen_latency_ms"}
#: Prefix of the metrics of lm-eval tasks (``task:TASK:METRIC``, ``steps.tasks``): one report column each.
TASK_PREFIX = "task:"


def within_noise(m: Rec, base: Rec, key: str) -> bool | None:
    """Whether ``m[key]`` differs from the baseline's by less than the noise: the larger of the two
    interquartile ranges of the repeats (``KEY_iqr``). None where either figure or both spreads are unknown."""
    a, b = m.get(key), base.get(key)
    spreads = [x for x in (m.get(f"{key}_iqr"), base.get(f"{key}_iqr")) if x is not None]
    if a is None or b is None or not spreads:
        return None
    return abs(a - b) < max(spreads)


def task_scores(metrics: Any) -> Rec:
    """``{task:TASK:METRIC: value}`` of a step's metrics (lm-eval tasks)."""
    return {k: v for k, v in _dict(metrics).items() if isinstance(k, str) and k.startswith(TASK_PREFIX)
            and _num(v) is not None}


def pct(new: float | None, base: float | None) -> float | None:
    return None if new is None or not base else round((new - base) / abs(base) * 100.0, 4)


def _read_json(path: Path) -> Rec | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _attempts(store: Store, name: str, job: JobRow | None) -> list[Rec]:
    rows = store.attempts(name)
    last_of_run = {a.run: a.number for a in rows}
    asked = {number: str(e.get("reason")) for number, e in store.attempt_events(name, kinds=(STOP_REQUESTED,))}
    for a in rows:  # the current run's last attempt: the job's own reason, where no stop was recorded
        if job is not None and job.reason is not None and a.run == job.run and last_of_run[a.run] == a.number:
            asked.setdefault(a.number, job.reason.value)
    return [{
        "number": a.number, "run": a.run, "status": a.status, "started_at": a.started_at,
        "ended_at": a.ended_at, "duration_s": max(0.0, (a.ended_at or store.clock.time()) - a.started_at),
        "hourly_usd": a.hourly_usd, "nodes": a.nodes, "spot": bool(a.spot),
        "usd": store.spend(name, a.number), "exit_code": a.exit_code, "detail": a.detail,
        "ended_as": ended_as(a.status, a.exit_code, asked.get(a.number)),
    } for a in rows]


def ended_as(status: str, exit_code: int | None, stop_reason: str | None) -> str:
    """How an attempt ended, in words. A stop on request (exit 143) is a Ctrl-C or `optjob down`
    unless the manager asked for it at the budget (``stop_reason``: why the manager asked it to
    stop, where known); exit 4 is the workload's own stop at the budget deadline."""
    if exit_code == EXIT_DEADLINE:
        return "stopped at the budget deadline"
    if exit_code == EXIT_SIGNAL or (status == "stopped" and exit_code is None):
        if stop_reason == "budget":
            return "stopped at the budget cap"
        return "cancelled (Ctrl-C or `optjob down`)"
    return status + (f" (exit {exit_code})" if exit_code not in (None, 0) else "")


def step_key(rec: Rec) -> Any:
    """What identifies a step in events and records: its index, or (index, variant, variant step) for a
    compare variant's step (they share the compare step's index)."""
    if rec.get("variant") is None:
        return rec.get("index")
    return (rec.get("index"), rec.get("variant"), rec.get("variant_step"))


def step_costs(store: Store, name: str, attempts: list[Rec], walls: dict[Any, float]) -> dict[Any, float]:
    """{step index: dollars}: each attempt's spend, interrupted attempts and earlier runs included,
    split across the steps it worked on by its time on each (from its events: a step runs from its
    ``step_started`` to the next mark), its start-up and teardown with them. Spend of an attempt that
    reached no step of this report is split by the steps' wall time (``walls``). The values sum to the
    spend whenever there is a step to give it to."""
    marks: dict[int, list[Rec]] = {}
    for number, e in store.attempt_events(name, kinds=MARKS):
        if _num(e.get("ts")) is not None:
            marks.setdefault(number, []).append(e)
    costs: dict[Any, float] = {}
    pool = 0.0
    for a in attempts:
        spans: dict[Any, float] = {}
        events = sorted(marks.get(a["number"], []), key=lambda e: e["ts"])
        for e, nxt in zip(events, [*events[1:], None] if events else [], strict=True):
            if e.get("event") != "step_started" or step_key(e) not in walls:
                continue
            end = nxt["ts"] if nxt is not None else (a["ended_at"] or e["ts"])
            spans[step_key(e)] = spans.get(step_key(e), 0.0) + max(0.0, end - e["ts"])
        busy = sum(spans.values())
        if busy <= 0:
            pool += a["usd"]
            continue
        for index, seconds in spans.items():
            costs[index] = costs.get(index, 0.0) + a["usd"] * seconds / busy
    if pool:
        weights = {i: w for i, w in walls.items() if w > 0} or {i: c for i, c in costs.items() if c > 0}
        total = sum(weights.values())
        for index, w in weights.items():
            costs[index] = costs.get(index, 0.0) + pool * w / total
    return costs


def _curve_key(rec: Rec) -> str:
    """``1-train``; a compare variant's step ``1-distill (NAME)`` (its variants share the index)."""
    key = f"{rec.get('index')}-{rec.get('kind')}"
    return key if rec.get("variant") is None else f"{key} ({rec.get('variant')})"


def _curves(steps: list[Rec], events: list[Rec]) -> dict[str, list[list[float]]]:
    """Loss curves from results.json, else from the run's progress events."""
    curves: dict[str, list[list[float]]] = {}
    for s in steps:
        extra = _dict(s.get("extra"))  # train: loss_curve; prune and distill: losses
        pts = [[p[0], p[1]] for p in extra.get("loss_curve") or extra.get("losses") or []
               if isinstance(p, (list, tuple)) and len(p) >= 2 and None not in map(_num, p[:2])]
        if pts:
            curves[_curve_key(s)] = pts
    seen: dict[str, dict[float, float]] = {}
    for e in events:  # a resumed attempt repeats steps: the later point wins
        step, loss = _num(e.get("step")), _num(e.get("loss"))
        key = _curve_key(e)
        if e.get("event") == "progress" and e.get("kind") in TRAINING_KINDS and loss is not None:
            seen.setdefault(key, {})[step if step is not None else len(seen.get(key, ()))] = loss
    for key, pts_by_step in seen.items():
        curves.setdefault(key, [[k, pts_by_step[k]] for k in sorted(pts_by_step)])
    return curves


def _trials(steps: list[Rec], events: list[Rec], spec_json: str | None) -> list[Rec]:
    """HPO trials (results.json wins over events for the same number), the best one marked."""
    groups: dict[Any, dict[Any, Rec]] = {}
    extras = {s.get("index"): _dict(s.get("extra")) for s in steps}
    chosen = {s.get("index"): _dict(s.get("metrics")).get("best_trial") for s in steps}
    for e in events:
        if e.get("event") == "trial":
            groups.setdefault(e.get("index"), {})[e.get("number")] = e
    for index, extra in extras.items():
        for t in extra.get("trials") or []:
            if isinstance(t, dict):
                groups.setdefault(index, {})[t.get("number")] = t
    try:
        spec_steps = [next(iter(s.values())) for s in json.loads(spec_json or "{}").get("steps")]
    except (ValueError, TypeError, AttributeError, StopIteration):
        spec_steps = []
    out = []
    for index, trials in groups.items():
        opts = spec_steps[index] if isinstance(index, int) and 0 <= index < len(spec_steps) else {}
        direction = extras.get(index, {}).get("direction") or _dict(opts).get("direction")
        rows = [{"index": index, "number": t.get("number"), "params": _dict(t.get("params")),
                 "value": _num(t.get("value")), "state": str(t.get("state") or ""), "best": False}
                for _, t in sorted(trials.items(), key=lambda kv: _sort_key(kv[0]))]
        done = [r for r in rows if r["value"] is not None
                and r["state"].upper().rsplit(".", 1)[-1] in ("COMPLETE", "")]
        if done:
            best = (max if direction == "maximize" else min)(done, key=lambda r: r["value"])
            named = [r for r in done if r["number"] == chosen.get(index)] or \
                [r for r in done if r["params"] == extras.get(index, {}).get("best_params")]
            (named[0] if named else best)["best"] = True
        out += rows
    return out


def hardware(job: JobRow | None) -> str | None:
    """Where the job ran, from the offer its plan chose: ``aws us-east-1 p4d.24xlarge (A100:8, spot)``,
    ``this machine``."""
    if job is None:
        return None
    c = job.plan.get("chosen") or {}
    if job.provider == "local" or c.get("cloud") in (None, "local"):
        return "this machine" + (" (dry run)" if job.plan.get("dry_run") else "")
    nodes = (job.plan.get("resources") or {}).get("nodes") or 1
    inside = ", ".join(x for x in (c.get("accelerators") or "CPU", "spot" if c.get("spot") else "",
                                   f"{nodes} nodes" if nodes > 1 else "") if x)
    return " ".join(str(x) for x in (c.get("cloud"), c.get("region"), c.get("instance_type")) if x) + f" ({inside})"


def report_data(store: Store, name: str) -> Rec:
    """Everything the report shows, as one JSON-serialisable dict (see the module docstring)."""
    job = store.job(name)
    job_dir = Path(job.job_dir) if job else paths.job_dir(name)
    attempts = _attempts(store, name, job)
    this_run = {a["number"] for a in attempts if job is None or a["run"] == job.run}
    events = [e for _, e in store.events(name, kinds=("progress", "trial", "step_done"))
              if e.get("attempt") is None or e.get("attempt") in this_run]
    results = _read_json(job_dir / RESULTS_FILE)
    steps = [s for s in (results or {}).get("steps") or [] if isinstance(s, dict)]
    source = "results" if results is not None else None
    if not steps:  # no results.json (yet): the steps that reported step_done
        done = {e.get("index"): e for e in events
                if e.get("event") == "step_done" and not e.get("skipped")}
        steps = [done[k] for k in sorted(done, key=_sort_key)]
        source = source or ("events" if steps else None)
    baseline = pick((results or {}).get("baseline"))
    run_usd = sum(a["usd"] for a in attempts if a["number"] in this_run)
    costs = step_costs(store, name, attempts, {step_key(s): _num(s.get("wall_s")) or 0.0 for s in steps})

    def row(index: Any, kind: Any, label: str, metrics: Any, wall: Any = None, output: Any = None,
            variant: str | None = None, cost_of: list[Any] | None = None) -> Rec:
        m = pick(metrics)
        cost = sum(costs.get(k, 0.0) for k in cost_of or [index]) if wall is not None and costs else None
        return {"index": index, "kind": kind, "label": label, "variant": variant, "wall_s": wall, "output": output,
                **m, "cost_usd": cost, **{d: None if kind == "baseline" else pct(m[k], baseline[k])
                                          for d, k in DELTAS.items()},
                **{n: None if kind == "baseline" else within_noise(m, baseline, k) for n, k in NOISE.items()},
                "tasks": task_scores(metrics), "metrics": _dict(metrics)}

    rows = [row(None, "baseline", "baseline", (results or {}).get("baseline"))] if any(
        v is not None for v in baseline.values()) else []
    for s in steps:
        if s.get("variant") is not None:
            continue  # one row per variant, below
        method = pick(s.get("metrics"))["method"]
        label = f"{_or(s.get('index'), '')} {s.get('kind')}".strip()
        label += f" ({method})" if method else ""
        rows.append(row(s.get("index"), s.get("kind"), label, s.get("metrics"),
                        _num(s.get("wall_s")), output=s.get("output")))
    final = (results or {}).get("final")
    if isinstance(final, dict) and steps and final != steps[-1].get("metrics"):
        # The pipeline did not end with evaluate: the runner measured the last model itself.
        last = f"{_or(steps[-1].get('index'), '')} {steps[-1].get('kind')}".strip()
        rows.append(row(steps[-1].get("index"), "final", f"final (after {last})", final,
                        output=steps[-1].get("output")))
    rows += variant_rows(steps, row)
    plan = job.plan if job else {}
    return {
        "name": name, "status": job.status.value if job else "unknown",
        "date": (job.started_at or job.created_at) if job else None, "hardware": hardware(job),
        "estimated_usd": _num((plan.get("chosen") or {}).get("est_usd")),
        "reason": job.reason.value if job and job.reason else None,
        "message": job.message if job else None, "run": job.run if job else None,
        "job_dir": str(job_dir), "results_source": source, "spent_usd": store.spend(name),
        "run_spent_usd": run_usd, "attempts": attempts, "baseline": baseline, "rows": rows,
        "hpo_trials": _trials(steps, events, job.spec_json if job else None),
        "loss_curves": _curves(steps, events), "final": pick((results or {}).get("final")),
        "task_columns": sorted({k for r in rows for k in r["tasks"]}),
        "cost_note": COST_NOTE, "fronts": fronts(rows) if any(r["variant"] for r in rows) else None,
    }


def variant_rows(steps: list[Rec], row: Any) -> list[Rec]:
    """One row per compare variant: its last step's model and measurements, the wall time and cost of
    all its steps, its recipe (``prune (wanda) → quantize (rtn int4 g128)``) and whether it is on the
    Pareto fronts (``on_front``: the fronts it is on, by name)."""
    by: dict[str, list[Rec]] = {}
    for s in steps:
        if s.get("variant") is not None:
            by.setdefault(str(s["variant"]), []).append(s)
    out = []
    for name, parts in by.items():
        last = parts[-1]
        recipe = " → ".join(f"{p.get('kind')}" + (f" ({m})" if (m := pick(p.get("metrics"))["method"]) else "")
                            for p in parts)
        walls = [_num(p.get("wall_s")) for p in parts]
        wall = sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None
        r = row(last.get("index"), "variant", f"{name}: {recipe}", last.get("metrics"), wall,
                output=last.get("output"), variant=name, cost_of=[step_key(p) for p in parts])
        out.append({**r, "recipe": recipe, "steps": len(parts)})
    front = fronts(out)
    for r in out:
        r["on_front"] = [label for label, names in front.items() if r["variant"] in names]
    return out
