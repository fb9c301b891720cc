"""Device choice, CPU threads, mixed precision and memory readings."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator

import torch
from optjob.specs.errors import StepError


def pick_device(choice: str = "auto") -> torch.device:
    """``auto``: cuda > mps > cpu; ``cpu``/``cuda``/``mps`` force one (absent: an error)."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise StepError(f"device {choice!r} asked for, but torch sees no CUDA device")
    try:
        return torch.device(choice)
    except RuntimeError as exc:
        raise StepError(f"unknown device {choice!r}: {exc}") from None


def set_threads() -> int:
    """One intra-op thread per CPU this process may use, unless OMP_NUM_THREADS says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus))
    return cpus


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device (None: plain fp32).

    fp16 autocast is a CUDA feature here; on other devices it runs as bf16."""
    if precision == "fp32":
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
