"""DDP and FSDP over NCCL where the machine has more than one GPU: the workload itself
(``python -m optjob.steps run JOB_DIR`` under torchrun, one process per GPU) on a job folder holding
one train step with ``strategy: ddp`` / ``fsdp``; its events give the losses and tokens/s."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from typing import Any

from .bench import Bench
from .harness import CheckFailed, Skip

STRATEGIES = ("ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distributed_case(b: Bench, out: dict[str, Any], strategy: str, timeout_s: float = 300.0) -> None:
    import torch
    from optjob.specs import TrainStep
    from optjob.steps.events import parse_event
    from optjob.steps.layout import JobFile

    out.update(unit="tokens/s (the workload's progress events, all GPUs)", goal="loss finite and decreasing")
    b.need_cuda()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(f"{gpus} GPU: needs more than one")
    if strategy != "ddp" and "strategy" not in TrainStep.model_fields:
        raise Skip(f"this checkout's train step has no strategy field ({strategy})")
    train = b.train_options(max_steps=b.sizes.train_steps, precision="bf16", batch_size=b.sizes.batch * gpus,
                            log_every=1, checkpoint_every=b.sizes.train_steps)
    if "strategy" in TrainStep.model_fields:
        train["strategy"] = strategy
    spec = {"name": f"gpu-check-{strategy}", "model": {"init": b.sizes.init}, "data": b.data(),
            "steps": [{"train": train}]}
    folder = b.tmp / f"dist-{strategy}"
    JobFile(spec=spec, device=b.device.type, cache_dir=str(b.cache),
            extra={"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 2}}).write(folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "optjob.steps", "run", str(folder)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e is not None]
    progress = [e for e in events
                if e["event"] == "progress" and e.get("kind") == "train" and e.get("loss") is not None]
    losses = [float(e["loss"]) for e in progress]
    out["metrics"] = {"gpus": gpus, "returncode": proc.returncode, "losses": losses,
                      "events": sorted({e["event"] for e in events}), "stderr_tail": proc.stderr[-2000:]}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise CheckFailed(f"torchrun exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    if not progress:
        raise CheckFailed("no train progress events")
    out.update(figure=round(float(progress[-1].get("tokens_per_s") or 0.0), 1))
    if not all(math.isfinite(v) for v in losses) or not losses[-1] < losses[0]:
        out["met"] = False
        raise CheckFailed(f"losses not finite and decreasing: first {losses[0]}, last {losses[-1]}")
    out["met"] = True
