"""What a dry run's workload tells the manager beyond "it ran": the stand-in it ran on, and that
each step's output folder loads back as a user would load it (``check`` events, ``steps.events``).

The manager (``manager.dry_run_report``) turns them into the dry run's "verified" list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optjob.specs import JobSpec

from . import phases
from .events import Emitter


def stand_in(emitter: Emitter, real: JobSpec, proxy: JobSpec) -> None:
    """Say which tiny model and data stood in for the spec's."""
    init = proxy.model.init
    model = ({"family": init.family, "layers": init.layers, "hidden": init.hidden, "vocab": init.vocab}
             if init is not None else {})
    emitter.emit("check", what="stand_in", ok=True, model=model, data=proxy.data.source,
                 replaced_data=proxy.data.source != real.data.source)


def reload(emitter: Emitter, index: int, kind: str, folder: Path | None, **where: Any) -> None:
    """Load ``folder`` with plain ``AutoModelForCausalLM.from_pretrained`` (quantized outputs included:
    their ``quantization_config`` is in config.json). A failure is the dry run's failure. ``where``:
    more fields of the check event (a compare variant's ``variant`` and ``variant_step``)."""
    if folder is None or not (folder / "config.json").is_file():
        return
    from optjob.specs.errors import StepError
    from transformers import AutoModelForCausalLM

    phases.start("reload", index=index, kind=kind)
    try:
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        emitter.emit("check", what="reload", ok=False, index=index, kind=kind, detail=detail, **where)
        raise StepError(f"steps[{index}] ({kind}): its output {folder} does not load with "
                        f"AutoModelForCausalLM.from_pretrained: {detail}") from None
    phases.end("reload")
    emitter.emit("check", what="reload", ok=True, index=index, kind=kind, detail=str(folder), **where)
