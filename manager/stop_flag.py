"""The stop flag a cloud node watches in the job's storage (``providers.sky_task.STOP_FLAG_KEY``).

SkyPilot's cancel SIGTERMs the workload and removes its node at once, so a budget stop that
cancelled first could lose the checkpoint the SIGTERM asked for before it reached storage. The
manager asks here instead: the node's watcher (the run script's, every ``STOP_FLAG_POLL_S``) SIGTERMs
the workload, which checkpoints, uploads and exits; the cancel comes only when the manager escalates
after the grace (``reconcile.enforce_stop``). The flag names the attempts it is for (this run's
first to the current one), so a later run's node, started from the same storage, ignores it.
"""

from __future__ import annotations

import json
import logging

from .store import JobRow, Store

log = logging.getLogger(__name__)


def write_stop_flag(store: Store, job: JobRow, attempt: int) -> bool:
    """Ask the nodes of ``job``'s attempts of this run up to ``attempt`` to stop; False when the job has
    no storage or it cannot be written (then the provider cancels at once, gracefully)."""
    from optjob.providers.sky_task import STOP_FLAG_KEY
    from optjob.steps.storage import open_storage

    try:
        spec = job.spec()
    except Exception as exc:  # a record this version cannot read: no flag
        log.warning("no stop flag for %s: %s", job.name, exc)
        return False
    if not spec.storage.artifacts:
        return False
    attempts = store.attempts(job.name, run=job.run)
    first = attempts[0].number if attempts else attempt
    flag = {"first_attempt": first, "attempt": attempt, "requested_at": store.clock.time()}
    try:
        storage = open_storage(spec.storage.artifacts, endpoint_url=spec.storage.endpoint_url)
        storage.put_bytes(STOP_FLAG_KEY, json.dumps(flag).encode())
    except Exception as exc:  # storage unreachable, no credentials here: the provider cancels instead
        log.warning("could not write the stop flag of %s: %s", job.name, exc)
        return False
    return True
