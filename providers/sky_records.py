"""Reading SkyPilot 0.14's records (``sky.status`` clusters, ``sky.jobs.queue_v2`` managed jobs) into
plain values: statuses, nodes and spot-ness from resources strings, and what was launched
(``placement_of``). No ``sky`` import: records are read by field name (dict or attribute).

Sources (paths under ``.venv/lib/python3.11/site-packages/sky/``): launched strings
``2x[spot](gpus=A100:8, cpus=96, mem=1152, p4d.24xlarge, disk=256)`` from utils/resources_utils.py:360-430
``format_resource`` (lowercase ``[spot]``, the instance type the one element without ``=``) prefixed
``Nx`` by ``get_readable_resources_repr`` (:433-460); requested strings ``1x[A100:8][Spot]`` /
``[On-demand|Spot]`` from backends/backend_utils.py ``get_task_resources_str``; a cluster record's
``handle.launched_resources`` / ``launched_nodes`` (schemas/api/responses.py:99 ``StatusResponse``); a
managed job's ``cloud`` / ``region`` / ``zone`` / ``accelerators`` / ``cluster_resources_full``
(jobs/utils.py:3276-3292, and their fallbacks once the job is over, :3462-3500).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import Placement


def _field(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        value = rec.get(name, default)
    else:
        value = getattr(rec, name, default)
    return default if value is None else value


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


_SPOT = re.compile(r"\[spot\]", re.I)


def _nodes_spot(resources: str) -> tuple[int, bool | None]:
    """Nodes and spot-ness from a SkyPilot resources string: ``2x[spot](gpus=A100:8, ...)`` (launched,
    lowercase), ``1x(gpus=...)`` (launched on demand), ``1x[A100:8][Spot]`` (requested). Spot is
    None when the string does not say (``-``, empty, or ``[On-demand|Spot]``: not launched yet)."""
    text = (resources or "").strip()
    m = re.match(r"(\d+)x", text)
    nodes = int(m.group(1)) if m else 1
    if not text or text == "-" or "On-demand|Spot" in text:
        return nodes, None
    return nodes, bool(_SPOT.search(text))


_FULL = re.compile(r"^(?:(\d+)x)?\s*(\[spot\])?\((.*)\)$", re.I)


def instance_type_of(resources_full: str) -> str | None:
    """The instance type in a launched resources string (``2x[spot](gpus=A100:8, cpus=96, mem=1152,
    p4d.24xlarge, disk=256)``: the element without ``=``); None in a requested one."""
    m = _FULL.match((resources_full or "").strip())
    if not m:
        return None
    words = [w.strip() for w in m.group(3).split(",")]
    return next((w for w in words if w and "=" not in w and w != "..." and " " not in w), None)


def _accelerators(value: Any) -> str | None:
    if isinstance(value, Mapping) and value:
        name, count = next(iter(value.items()))
        return f"{name}:{_num(count)}"
    text = str(value or "").strip()
    return text if text and text not in ("-", "None", "{}") else None


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _cloud(value: Any) -> str | None:
    text = str(value or "").strip().lower()
    return text if text and text not in ("-", "none") else None


def placement_of(record: Any, *, nodes: int | None = None) -> Placement | None:
    """What a ``sky.status`` record (its ``handle.launched_resources``) or a managed-job record
    (``cloud``, ``region``, ``cluster_resources_full``) says was launched; None when nothing was."""
    handle = _field(record, "handle")
    res = getattr(handle, "launched_resources", None) if handle is not None else None
    if res is not None and getattr(res, "cloud", None) is not None:
        launched = getattr(handle, "launched_nodes", None)
        return Placement(cloud=str(res.cloud).lower(), region=res.region, zone=res.zone,
                         instance_type=res.instance_type, spot=bool(res.use_spot),
                         nodes=int(launched or nodes or 1), accelerators=_accelerators(res.accelerators))
    full = str(_field(record, "cluster_resources_full", "") or _field(record, "resources_str_full", ""))
    cloud = _cloud(_field(record, "cloud"))
    itype = instance_type_of(full)
    if cloud is None or itype is None:
        return None
    count, spot = _nodes_spot(full)
    region = _cloud(_field(record, "region"))
    zone = _cloud(_field(record, "zone"))
    return Placement(cloud=cloud, region=_field(record, "region") if region else None,
                     zone=_field(record, "zone") if zone else None, instance_type=itype, spot=bool(spot),
                     nodes=nodes or count, accelerators=_accelerators(_field(record, "accelerators")))
