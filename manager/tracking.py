"""``tracking: {mlflow: URI}``: when a job's run ends, one MLflow run (experiment ``optjob`` unless
the spec names another, run named ``NAME-runN``) gets the spec's main settings as params, every
step's metrics (``01-train/perplexity``...), the loss curves and hpo trials as metric histories,
the spend, and the report files as artifacts — through MLflow's own client (``MlflowClient``),
imported only here and only then.

Once per run (a ``tracked`` event records it); a server that cannot be reached, or mlflow not
installed, is one warning line and never fails the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .store import Store

#: The manager's record that a run was logged (so it is logged once).
TRACKED = "tracked"
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def _tracking(spec_json: str | None) -> dict[str, Any] | None:
    """The ``tracking`` section of a stored spec, read without validating the rest."""
    tracking = (json.loads(spec_json) or {}).get("tracking") if spec_json else None
    return tracking if isinstance(tracking, dict) and isinstance(tracking.get("mlflow"), str) else None


def key(text: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_-. /``)."""
    return _KEY.sub("_", text)[:250]


def params_of(spec: dict[str, Any]) -> dict[str, str]:
    """The settings worth comparing runs by: model, data, each step's kind and options, resources, budget."""
    out: dict[str, str] = {}
    model = spec.get("model") or {}
    out["model"] = str(model.get("hf") or model.get("path") or json.dumps(model.get("init"), sort_keys=True))
    out["data.source"] = str((spec.get("data") or {}).get("source"))
    for i, entry in enumerate(spec.get("steps") or []):
        for kind, options in (entry or {}).items():
            out[f"steps.{i}.kind"] = kind
            for k, v in (options or {}).items():
                if v is not None and not isinstance(v, (dict, list)):
                    out[key(f"steps.{i}.{kind}.{k}")] = str(v)
    for section in ("resources", "budget"):
        for k, v in (spec.get(section) or {}).items():
            if v is not None:
                out[key(f"{section}.{k}")] = str(v)[:500]
    return out


def track_ended(store: Store, name: str) -> str | None:
    """Log the run of ``name`` that just ended to its spec's MLflow server; a warning line when that
    could not be done (the job stands as it is)."""
    job = store.job(name)
    if job is None or not job.status.is_terminal():
        return None
    try:
        tracking = _tracking(job.spec_json)
    except ValueError:
        return None
    if tracking is None:
        return None
    if any(e.get("run") == job.run for _, e in store.attempt_events(name, kinds=(TRACKED,))):
        return None
    uri = tracking["mlflow"]
    # One try, a short wait: the manager must not hang on a tracking server that is down
    # (MLflow's own default retries for minutes).
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
        os.environ.setdefault(var, value)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return f"tracking: mlflow is not installed here (pip install mlflow); {name} was not logged to {uri}"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the command's own (apply --json)
            run_id = log_run(MlflowClient(tracking_uri=uri), store, name, tracking.get("experiment") or "optjob")
    except Exception as exc:  # the client raises its own exception types (MlflowException, requests'...)
        why = " ".join(str(exc).split())[:200]
        return f"tracking: could not log {name} to MLflow at {uri}: {type(exc).__name__}: {why}"
    attempts = store.attempts(name, run=job.run)
    store.add_events(name, attempts[-1].number if attempts else 0,
                     [{"event": TRACKED, "ts": store.clock.time(), "run": job.run, "mlflow_run_id": run_id}])
    return None


def log_run(client: Any, store: Store, name: str, experiment: str) -> str:
    """Create the MLflow run of ``name``'s last run and log everything into it; its id."""
    from .report import report_data

    job = store.job(name)
    assert job is not None
    data = report_data(store, name)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"{name}-run{job.run}",
                            tags={"optjob.job": name, "optjob.status": data["status"],
                                  "optjob.reason": str(data["reason"]), "optjob.hardware": str(data.get("hardware")),
                                  "optjob.job_dir": data["job_dir"]})
    run_id = str(run.info.run_id)
    from mlflow.entities import Metric, Param

    now = int(store.clock.time() * 1000)
    params = [Param(k, v[:6000]) for k, v in params_of(json.loads(job.spec_json)).items()]
    metrics = [Metric(key(k), v, now, step) for k, v, step in metric_points(data)]
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
    for f in ("report.md", "report.html", "loss_curves.svg", "tradeoff.svg"):
        path = Path(data["job_dir"]) / f
        if path.is_file():
            client.log_artifact(run_id, str(path))
    status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(data["status"], "KILLED")
    client.set_terminated(run_id, status=status)
    return run_id


def metric_points(data: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of every figure of a job's report data, as MLflow gets them: each row's
    metrics under its step (``01-prune/perplexity``; a compare variant's ``02-compare-wanda/...``),
    loss curves, hpo trials, and the spend."""
    out: list[tuple[str, float, int]] = []

    def metric(name_: str, value: Any, step: int = 0) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out.append((name_, float(value), int(step)))

    for r in data["rows"]:
        prefix = "baseline" if r["kind"] == "baseline" else (
            "final" if r["kind"] == "final" else f"{r['index']:02d}-{r['kind']}" if isinstance(r["index"], int)
            else str(r["kind"]))
        if r.get("variant"):  # a compare variant's row: its variants share the compare step's index
            prefix = f"{prefix}-{r['variant']}"
        for k, v in (r.get("metrics") or {}).items():
            metric(f"{prefix}/{k}", v)
        metric(f"{prefix}/cost_usd", r.get("cost_usd"))
    for curve, points in (data.get("loss_curves") or {}).items():
        index, _, kind = curve.partition("-")  # "1-train": the same name as the step's row, 01-train
        kind, _, variant = kind.partition(" (")  # "1-distill (small)": a compare variant's curve
        name_ = f"{int(index):02d}-{kind}" if index.isdigit() else curve
        name_ += f"-{variant.rstrip(')')}" if variant else ""
        for x, y in points:
            metric(f"{name_}/loss", y, int(x))
    for t in data.get("hpo_trials") or []:
        metric(f"{t['index']:02d}-hpo/trial_value" if isinstance(t["index"], int) else "hpo/trial_value",
               t.get("value"), int(t.get("number") or 0))
    metric("spent_usd", data["spent_usd"])
    metric("run_spent_usd", data["run_spent_usd"])
    metric("estimated_usd", data.get("estimated_usd"))
    return out
