"""``optjob logs NAME``: the workload's output, every attempt in order (``--follow`` until it ends).

By default a person reads it: each attempt under a header, events rendered as one line each
(``resuming from step 83``, ``0:train step 40/300 loss 2.512``), and the noise libraries print
(progress bars, torchao's missing optional kernels, deprecation warnings) left out. ``--json``
prints the raw lines, events included, exactly as the workload wrote them.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import click
from optjob.steps.events import parse_event

from ..store import open_store
from . import common
from .common import find_job

#: Lines libraries print that say nothing about the job (matched anywhere in the line).
NOISE = (
    re.compile(r"\d+%\|.*\|"),  # tqdm bars
    re.compile(r"Failed to load .*(\.so|_C)"),  # torchao without its optional CUDA kernels
    re.compile(r"(Deprecation|Future|User)Warning"),
    re.compile(r"^\s*warnings\.warn\("),
    re.compile(r"^\s*$"),
)


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


#: Phase starts worth a line of their own (a step's start and its checkpoints have their own events).
SHOWN_PHASES = frozenset({"pull", "data", "baseline", "step_eval", "final", "upload"})


def render_event(e: dict[str, Any]) -> str | None:
    """One readable line for an event (None for those that add nothing to the lines around them)."""
    kind, where = e.get("event"), f"{e.get('index', '?')}:{e.get('kind', '')}".rstrip(":")
    if e.get("variant"):  # a compare variant's step: its variants share the compare step's index
        where += f" ({e['variant']})"
    if kind == "phase":  # the phases no other event announces: data preparation, evaluations, uploads
        if e.get("state") == "start" and e.get("phase") in SHOWN_PHASES:
            from ..phases import phase_label

            return phase_label(e)
        return None
    if kind == "step_started":
        return f"{where} started"
    if kind == "progress":
        loss = e.get("loss")
        text = f"{where} step {e.get('step')}/{e.get('max_steps')}"
        text += f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
        tps = e.get("tokens_per_s")
        return text + (f" {tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
    if kind == "metrics":
        m = e.get("metrics") or {}
        return f"{where} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
    if kind == "checkpoint":
        took = e.get("seconds")
        return f"{where} checkpoint at step {e.get('step')}" + (f" ({took:.2f}s)" if isinstance(took, (int, float))
                                                                else "")
    if kind == "trial":
        value = e.get("value")
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (e.get("params") or {}).items())
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        return f"{where} trial {e.get('number')}: {shown} ({params}) {e.get('state', '')}".rstrip()
    if kind == "step_done":
        extra = " (already done: reused)" if e.get("skipped") else ""
        return f"{where} done in {e.get('wall_s', 0):.1f}s{extra}"
    if kind == "stopped":
        return f"stopped ({e.get('reason')})" + (f" at step {e.get('step')}" if e.get("step") is not None else "")
    if kind == "job_done":
        return f"job done in {e.get('wall_s', 0):.1f}s"
    if kind == "error":
        return f"error: {e.get('message')}"
    return None


def readable(text: str) -> str:
    """A log's text as a person reads it: events rendered, library noise dropped."""
    out = []
    for line in text.splitlines():
        event = parse_event(line)
        if event is not None:
            rendered = render_event(event)
            if rendered is not None:
                out.append(rendered)
        elif not is_noise(line):
            out.append(line)
    return "".join(f"{line}\n" for line in out)


def logs_command(name: str, *, follow: bool, attempt: int | None = None, tail: int | None = None,
                 as_json: bool = False) -> None:
    from optjob.providers.base import Handle
    from optjob.specs.errors import UsageError

    store = open_store()
    job = find_job(store, name)
    provider = common.provider_for(job.provider)
    numbers = [a.number for a in store.attempts(name) if a.handle]
    if attempt is not None and attempt not in numbers:
        raise UsageError(f"{name} has no attempt {attempt} with a log; attempts: "
                         f"{', '.join(map(str, numbers)) or 'none launched'}")
    offsets: dict[int, int] = {}
    headed: set[int] = set()
    first = True
    while True:
        lines: list[tuple[int, str, str]] = []  # (attempt, its status, line)
        for a in store.attempts(name):
            if not a.handle or (attempt is not None and a.number != attempt):
                continue
            text, offsets[a.number] = provider.read_log(Handle.from_json(a.handle), offsets.get(a.number, 0))
            lines += [(a.number, a.status, line) for line in (text if as_json else readable(text)).splitlines()]
        if first and tail is not None:
            lines = list(deque(lines, maxlen=tail))
        first = False
        for number, status, line in lines:
            if not as_json and number not in headed:
                click.echo(click.style(f"── attempt {number} ({status}) ──", bold=True))
                headed.add(number)
            click.echo(line)
        current = store.job(name)
        if not follow or current is None or current.status.is_terminal():
            return
        common.reconcile_all(store, [current])
        store.clock.sleep(0.5)
