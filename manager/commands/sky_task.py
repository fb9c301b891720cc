"""``optjob plan SPEC --sky-task``: the SkyPilot task YAML apply would launch, secrets left out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from optjob.specs.errors import UsageError

from .. import paths

if TYPE_CHECKING:
    from optjob.specs import JobSpec

    from ..plan import Plan


def sky_task_yaml(spec: JobSpec, spec_path: str, plan: Plan) -> str:
    """The task of attempt 1 for the plan's chosen offer: the job.json path and local inputs apply would
    mount, the wheel apply would ship (``OPTJOB_WHEEL``, else one named as the build will be)."""
    from importlib import metadata

    from optjob.providers.sky_task import input_mounts, preview_yaml

    from ..controller import resolve_paths

    if plan.local:
        raise UsageError(f"{spec.name}: this plan runs on this machine (resources.cloud: local, or --local), "
                         "so there is no SkyPilot task; drop --local or set resources.cloud")
    try:
        version = metadata.version("optjob")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    wheel = os.environ.get("OPTJOB_WHEEL") or f"/tmp/optjob-wheel/optjob-{version}-py3-none-any.whl"
    inputs = input_mounts({"spec": resolve_paths(spec, Path(spec_path).resolve().parent)})
    chosen = plan.chosen
    offer = None
    if chosen is not None:
        what = " ".join(str(x) for x in (chosen.cloud, chosen.region, chosen.instance_type, chosen.accelerators) if x)
        offer = f"{what}{' spot' if chosen.spot else ''} at ${chosen.hourly_usd:.4g}/h"
    return preview_yaml(spec, job_file=paths.job_dir(spec.name) / "job.json", wheel=wheel, inputs=inputs, offer=offer)
