"""Device choice, CPU threads, mixed precision and memory readings."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Iterator, Mapping

import torch
from optjob.specs.errors import StepError


def pick_device(
    choice: str = "auto",
    *,
    env: Mapping[str, str] | None = None,
    cuda: Callable[[], bool] | None = None,
    mps: Callable[[], bool] | None = None,
    xla: Callable[[bool], torch.device | None] | None = None,
) -> torch.device:
    """``auto``: xla (a TPU) > cuda > mps > cpu; ``xla``/``cpu``/``cuda``/``mps`` force
    one (absent: an error). ``OPTJOB_DEVICE`` (in ``env``, default ``os.environ``) stands
    in for ``auto``: the job file's explicit choice wins over it.

    The availability checks are parameters so the choice can be tested anywhere:
    ``cuda()`` / ``mps()`` say whether torch sees that device, ``xla(forced)`` returns
    the XLA device when torch_xla is importable and has one (``forced``: any XLA device
    will do; otherwise only a real accelerator, not XLA's CPU fallback), else None."""
    env = os.environ if env is None else env
    cuda = cuda or torch.cuda.is_available
    mps = mps or _mps_available
    xla = xla or _xla_device
    if choice == "auto":
        choice = (env.get("OPTJOB_DEVICE") or "auto").strip().lower()
    if choice == "auto":
        found = xla(False)
        if found is not None:
            return found
        if cuda():
            return torch.device("cuda")
        if mps():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("xla"):
        found = xla(True)
        if found is None:
            raise StepError(
                f"device {choice!r} asked for, but torch_xla is not installed or sees no XLA device"
            )
        return found
    if choice.startswith("cuda") and not cuda():
        raise StepError(f"device {choice!r} asked for, but torch sees no CUDA device")
    if choice.startswith("mps") and not mps():
        raise StepError(f"device {choice!r} asked for, but torch sees no MPS device")
    try:
        return torch.device(choice)
    except RuntimeError as exc:
        raise StepError(f"unknown device {choice!r}: {exc}") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and bool(backend.is_available())


def _xla_device(forced: bool) -> torch.device | None:
    """torch_xla's device, if torch_xla is importable and has one (not tested here:
    torch_xla only installs on TPU hosts). Unforced, XLA's CPU fallback does not count."""
    try:
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr
    except ImportError:
        return None
    try:
        if not forced and str(xr.device_type() or "").upper() in ("", "CPU"):
            return None
        return torch.device(xm.xla_device())
    except RuntimeError as exc:
        print(f"torch_xla is installed but has no device: {exc}", file=sys.stderr, flush=True)
        return None


def mark_step(device: torch.device) -> None:
    """End of an optimizer step: on XLA, cut the lazy graph and run it (else a no-op)."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def set_threads() -> int:
    """One intra-op thread per CPU this process may use (shared among the processes
    torchrun started on this node), unless OMP_NUM_THREADS says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        local = 1
    cpus = max(1, cpus // local)
    torch.set_num_threads(cpus)
    return cpus


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device (None: no autocast: plain fp32, or, under
    ``checkpoint``, the weights' own dtype).

    fp16 autocast is a CUDA feature here; on other devices it runs as bf16."""
    if precision in ("fp32", "checkpoint"):
        return None
    if precision == "fp16" and device.type != "cuda":
        print(f"precision fp16 runs as bf16 on {device.type}", file=sys.stderr, flush=True)
        return torch.bfloat16
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("this GPU has no bf16: using fp16 autocast", file=sys.stderr, flush=True)
        return torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory: allocated CUDA memory, or the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(rss if sys.platform == "darwin" else rss * 1024)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, and back into the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
