"""Reading a spec back from the state store: as strictly as a spec file, except for keys a later
version of optjob no longer knows, which are dropped so that an upgrade never strands a job."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optjob.specs import JobSpec

#: How many stored keys a later version may have dropped before a stored spec is given up on.
MAX_DROPPED_KEYS = 50


def read_stored_spec(spec_json: str) -> JobSpec:
    """A spec stored by this or an earlier optjob. A key this version no longer knows is dropped,
    not fatal, so an upgrade never stops a stored job from resuming (dstack reads stored data so);
    everything else is validated as strictly as a spec file."""
    from optjob.specs import JobSpec  # the spec models load only where a spec is read
    from pydantic import ValidationError

    data = json.loads(spec_json)
    for _ in range(MAX_DROPPED_KEYS):
        try:
            return JobSpec.model_validate(data)
        except ValidationError as exc:
            extra = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not extra:
                raise
            for loc in extra:
                _drop(data, loc)
    return JobSpec.model_validate(data)


def _drop(data: Any, loc: tuple[Any, ...]) -> None:
    """Remove the key at ``loc`` (a pydantic error location; union tags may sit in between)."""
    node = data
    for part in loc[:-1]:
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if (isinstance(node, dict) and part in node) or in_list:
            node = node[part]
        # a part that names a union member (a tag) is not in the data: skip it
    if isinstance(node, dict):
        node.pop(loc[-1], None)
