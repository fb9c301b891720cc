"""torch.distributed for the workload: one process per device, started by torchrun.

torchrun (``python -m torch.distributed.run``) describes the process group in the
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. ``init`` joins it (nccl on CUDA, gloo on the
CPU) and gives each process its device; without those variables (or with
``WORLD_SIZE=1``) every helper here is a no-op, so one code path serves both.

Who does what when ``world() > 1``:

* ``train`` and ``distill`` run on every rank with DistributedDataParallel (a train
  step with ``strategy: fsdp`` sharded with FSDP instead, see ``fsdp``); the spec's
  ``batch_size`` is the global batch, split among the ranks.
* Every other step (evaluate, prune, quantize, hpo) and the automatic evaluations
  run on rank 0 (``on_main``) while the other ranks wait; their result, or their
  failure or stop, is then shared so every rank carries on (or ends) the same way.
* Only rank 0 emits events (other ranks emit ``error`` events only), writes
  checkpoints, models, ``done.json`` and ``results.json``.

Small objects and waits go through a separate gloo group with a long timeout
(``OPTJOB_DIST_WAIT_S``, default 7 days: a rank-0-only hpo step may take hours),
so a rank waiting for rank 0 sleeps on a socket rather than spinning a GPU.
A folder that rank 0 wrote and another node cannot see (nodes without a shared
file system) is sent over that group by ``ensure_folder``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as td
from optjob.specs.errors import StepError
from torch import nn

from .context import StopFlag, StopRequested
from .events import Emitter

T = TypeVar("T")

#: Seconds a collective of the training loop may wait (OPTJOB_DIST_TIMEOUT_S overrides).
DEFAULT_TIMEOUT_S = 1800.0
#: Seconds a rank may wait for rank 0 (a rank-0-only step; OPTJOB_DIST_WAIT_S overrides).
DEFAULT_WAIT_S = 7 * 24 * 3600.0
#: Step kinds that run on every rank with DDP; the others run on rank 0 only.
DISTRIBUTED_KINDS = frozenset({"train", "distill"})
_STOP_CODES = {None: 0, "deadline": 1, "signal": 2}
_STOP_NAMES = {v: k for k, v in _STOP_CODES.items()}

_objects: Any = None  # the gloo group for objects and waits


class PeerFailed(StepError):
    """Raised on the other ranks when rank 0 fails in ``on_main`` (rank 0 reports it)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise StepError(f"{name}={value!r} is not a whole number (torchrun sets it)") from None


def env_world() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def world() -> int:
    """Number of processes in the job (1 without torchrun)."""
    return td.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank; before ``init``, ``RANK`` from the environment (0 when unset)."""
    return td.get_rank() if is_initialized() else _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that reports and writes."""
    return rank() == 0


def _seconds(name: str, default: float) -> timedelta:
    value = os.environ.get(name)
    try:
        return timedelta(seconds=float(value) if value else default)
    except ValueError:
        raise StepError(f"{name}={value!r} is not a number of seconds") from None


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group and return this rank's device (``cuda:LOCAL_RANK``
    on GPUs). A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): ``device`` as is."""
    global _objects
    n = env_world()
    if n <= 1 or is_initialized():
        return device
    if not td.is_available():
        raise StepError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise StepError(
            f"WORLD_SIZE={n} but {', '.join(missing)} unset: start several processes "
            "with torchrun (python -m torch.distributed.run), which sets them"
        )
    if device.type == "cuda":
        local, count = local_rank(), torch.cuda.device_count()
        if local >= count:
            raise StepError(
                f"LOCAL_RANK {local} has no GPU: this node has {count}; "
                f"start at most {count} processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise StepError(
            f"multi-process training on {device.type!r} devices is not supported: "
            "run one process (resources.nodes: 1) there"
        )
    td.init_process_group(backend, timeout=_seconds("OPTJOB_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    _objects = td.new_group(backend="gloo", timeout=_seconds("OPTJOB_DIST_WAIT_S", DEFAULT_WAIT_S))
    print(
        f"rank {rank()} of {world()} (local rank {local_rank()}), {backend} on {device}",
        file=sys.stderr,
        flush=True,
    )
    return device


def teardown(*, wait: bool = True) -> None:
    """Leave the process group. ``wait``: first wait (up to a minute) for every rank to
    get here, so no rank exits -- and makes torchrun stop the others -- while rank 0 is
    still writing or reporting. Not after an error: the other ranks may never come."""
    global _objects
    if not is_initialized():
        return
    if wait:
        try:
            td.monitored_barrier(group=_objects, timeout=timedelta(seconds=60))
        except RuntimeError as exc:
            print(f"rank {rank()}: not every rank reached the end: {exc}", file=sys.stderr, flush=True)
            return
    td.destroy_process_group()
    _objects = None


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        td.barrier(group=_objects)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` replaced, in place, by its mean over the ranks (returned for convenience)."""
    if is_initialized() and world() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
        t.div_(world())
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not is_initialized():
        return obj
    box: list[Any] = [obj]
    td.broadcast_object_list(box, src=src, group=_objects)
    return box[0]  # type: ignore[no-any-return]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; every rank gets its result. If it fails or stops on
    rank 0, every rank raises (``StopRequested`` with the same reason, or a StepError
    naming rank 0's error), so all ranks leave together."""
    if not is_initialized():
        return fn()
    if is_main():
        try:
            value = fn()
        except StopRequested as exc:
            broadcast_object(("stop", (exc.reason, exc.step)))
            raise
        except BaseException as exc:
            broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        broadcast_object(("ok", value))
        return value
    status, payload = cast("tuple[str, Any]", broadcast_object(("", None)))
    if status == "stop":
        reason, step = payload
        raise StopRequested(reason, step)
    if status == "error":
        raise PeerFailed(f"rank 0 failed: {payload}")
    return cast(T, payload)


def agree_stop(reason: str | None) -> str | None:
    """The stop reason every rank agrees on: a stop seen by any rank stops all of them
    ("signal" wins over "deadline"), so no rank leaves the loop alone."""
    if not is_initialized() or world() <= 1:
        return reason
    code = torch.tensor([_STOP_CODES.get(reason, 2)], dtype=torch.int64)
    td.all_reduce(code, op=td.ReduceOp.MAX, group=_objects)
    return _STOP_NAMES[int(code.item())]


def check_stop(stop: StopFlag, step: int | None = None) -> None:
    """``stop.check()`` agreed by every rank (see ``agree_stop``)."""
    reason = agree_stop(stop.reason())
    if reason is not None:
        raise StopRequested(reason, step)


def runs_everywhere(kind: str) -> bool:
    """True when a step of ``kind`` runs on every rank (DDP) rather than on rank 0 only."""
    return world() > 1 and kind in DISTRIBUTED_KINDS


def split_batch(batch_size: int, n: int | None = None) -> int:
    """Per-rank batch of the global ``batch_size`` over ``n`` ranks (default: ``world()``)."""
    n = world() if n is None else n
    if batch_size % n:
        raise StepError(
            f"batch_size {batch_size} is the global batch per micro-step and must split evenly "
            f"among the {n} processes (each takes batch_size / {n}): use a multiple of {n}"
        )
    return batch_size // n


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of the rows of a global ``batch``."""
    n = world()
    if n <= 1:
        return batch
    per = split_batch(batch.shape[0], n)
    r = rank()
    return batch[r * per : (r + 1) * per]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (which first copies rank 0's weights to
    every rank); a single process: ``model`` itself. Buffers are not re-broadcast at each
    forward: the models here only have constant ones (rotary tables)."""
    if world() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync: dict[str, Any] = {
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False
    }
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def ensure_folder(path: Path | None, present: Callable[[Path], bool] | None = None) -> None:
    """Make rank 0's folder ``path`` (a model, a checkpoint) exist on every rank.

    Ranks that share rank 0's file system already see it; a node without it gets the
    files from rank 0, one file at a time over the gloo group, written to a temporary
    folder and renamed into place. ``present(path)`` (default: ``path.is_dir()``) says
    whether a rank's copy is usable. Every rank must call this at the same point."""
    if path is None or not is_initialized() or world() <= 1:
        return
    ok = (present or Path.is_dir)(path)
    counts = torch.tensor([0 if ok else 1, 0 if ok or not is_main() else 1], dtype=torch.int64)
    td.all_reduce(counts, op=td.ReduceOp.SUM, group=_objects)
    missing, main_lacks = (int(c) for c in counts.tolist())
    if missing == 0 or main_lacks:  # nothing to do, or nothing to send (loading it will say so)
        return
    mine = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if is_main() else []
    names: list[str] = broadcast_object(mine)
    if is_main():
        print(f"sending {path} to {missing} rank(s) that cannot see it", file=sys.stderr, flush=True)
    receive = not is_main() and not ok
    usable = present or Path.is_dir
    tmp = None
    if receive:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".recv-{rank()}-"))
    try:
        for name in names:
            data: bytes = broadcast_object((path / name).read_bytes() if is_main() else b"")
            if tmp is not None:
                out = tmp / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
        if tmp is not None:
            if path.exists() and not usable(path):  # a broken copy
                shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                try:
                    os.replace(tmp, path)
                except OSError:  # another rank of this node got there first
                    if not usable(path):
                        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()


class RankEmitter(Emitter):
    """The emitter of a rank other than 0: only ``error`` events (tagged with the rank)
    get out, so the event stream reads as from one process."""

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        if kind != "error" or fields.get("error_type") == PeerFailed.__name__:
            return {"event": kind, **fields}
        return super().emit(kind, **fields, rank=rank())


def emitter() -> Emitter:
    """The event emitter for this process: a plain one on rank 0, else a ``RankEmitter``."""
    return Emitter() if is_main() else RankEmitter()

