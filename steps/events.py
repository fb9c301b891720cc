"""The JSON-lines event protocol between the workload (steps/) and the manager.

The workload prints one JSON object per line on stdout; anything else on stdout
or stderr is ordinary log text. The manager reads the same lines from a local
log file or from SkyPilot's log stream, so the protocol is all it depends on.
This module is stdlib-only: the manager imports it without torch.

Every event has ``event`` (a kind below), ``ts`` (unix seconds) and ``v``
(protocol version). Fields by kind:

============== ==================================================================
step_started   index, kind, total (number of steps)
progress       index, kind, step, max_steps, loss, lr, tokens, tokens_per_s; hpo: after each
               trial, step = trials finished of max_steps = trials, trial, state, loss (the
               trial's eval loss) and best (the best value so far) where there are numbers
metrics        index, kind, metrics {eval_loss, perplexity, accuracy, ...}, step?
checkpoint     index, kind, step, path, seconds (the write's duration; hpo: the study, saved after
               each trial; step as progress)
trial          index, number, params, value, state (hpo)
step_done      index, kind, output (model dir), wall_s, metrics, skipped (bool)
stopped        index, reason ("deadline" | "signal" | "deadline-hard": the watchdog ended a phase
               that did not stop in time), step
job_done       results (path of results.json), wall_s
error          message, error_type, index?
phase          phase (``steps.phases``: starting, pull, data, baseline, step, step_eval, final,
               checkpoint, upload, reload), state ("start" | "update" | "end"), index?, kind?,
               done?, total?, unit? (progress inside the phase), wall_s (at "end")
check          what ("stand_in": the dry run's tiny model, ``model`` and ``data``; "reload": a step's
               output loaded back with ``AutoModelForCausalLM.from_pretrained``; "tasks": lm-eval
               tasks a dry run left to the real run), ok, detail?, skipped? (what was not run),
               index?, kind? (dry runs only; ``manager.dry_run_report`` lists them)
============== ==================================================================
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

PROTOCOL_VERSION = 1
KINDS = frozenset(
    {"step_started", "progress", "metrics", "checkpoint", "trial", "step_done", "stopped",
     "job_done", "error", "phase", "check"}
)
_PREFIX = '{"event": '


class Emitter:
    """Writes events to a stream (stdout by default), one line each, flushed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        # ``kind`` is positional-only so events can carry a ``kind`` field (the step kind).
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"event": kind, "ts": round(time.time(), 3), "v": PROTOCOL_VERSION, **fields}
        self.stream.write(json.dumps(event, default=_default, allow_nan=False) + "\n")
        self.stream.flush()
        return event


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on this line, or None for ordinary log text (never raises)."""
    line = line.strip()
    if not line.startswith(_PREFIX):
        # SkyPilot prefixes node output with "(task, pid=..) "; find the event after it.
        at = line.find(_PREFIX)
        if at < 0:
            return None
        line = line[at:]
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in KINDS:
        return None
    return event
