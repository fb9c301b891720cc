"""A step's fingerprint: one hash of everything its output depends on (model, data, the steps up to it).

A finished step whose fingerprint is unchanged is reused on re-apply; a changed one runs again with the
steps after it. So the hash leaves out what does not change a step's output, and fields added to the
spec after fingerprints existed are hashed only when set, so an upgrade does not rerun finished work:

* ``strategy`` (ddp or fsdp: how a step is spread over processes, which the plan may pick differently
  on another offer; checkpoints resume across strategies);
* ``tasks`` / ``task_limit`` / ``task_fewshot`` of an evaluate step, when at their defaults.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Never hashed: how a step runs, not what it computes.
NOT_HASHED = ("strategy",)
#: Hashed only when set (added after fingerprints existed): field -> its default.
HASHED_WHEN_SET: dict[str, Any] = {"tasks": [], "task_limit": None, "task_fewshot": None}


def _body(entry: Any) -> Any:
    if not isinstance(entry, dict) or len(entry) != 1:
        return entry
    ((kind, body),) = entry.items()
    if kind == "compare" and isinstance(body, dict):
        return {kind: {name: [_body(e) for e in steps] for name, steps in body.items()}}
    if not isinstance(body, dict):
        return entry
    kept = {k: v for k, v in body.items()
            if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}
    return {kind: kept}


def fingerprint(dumped_spec: dict[str, Any], upto: int, dry_run: bool) -> str:
    """The fingerprint of step ``upto`` of a spec dumped in JSON mode (``model_dump(mode="json")``)."""
    steps = [_body(e) for e in dumped_spec["steps"][: upto + 1]]
    base = {"model": dumped_spec["model"], "data": dumped_spec["data"], "dry_run": dry_run, "steps": steps}
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]
