"""Distributed training (torchrun + DDP) on the CPU, and the device choice.

The end-to-end test runs the same tiny pipeline -- train, prune (rank 0 only), distill,
evaluate -- once as one process and once as two processes under torchrun (gloo), and
compares what they report. ``batch_size`` is the global batch: each of the two ranks
trains on 4 of the 8 rows and DDP averages the two gradients, which is the gradient of
the 8-row mean loss; the reported loss is the mean of the two ranks' losses, which is
the 8-row mean. So the two runs compute the same numbers, summed in a different order:

* per-step losses agree to ``rtol=1e-5`` (measured: a few 1e-7 relative -- float32
  rounding, since one process sums 256 token losses at once and two processes sum 128
  each and then average, and gloo's all-reduce adds the gradients in its own order);
* final weights agree to ``atol=1e-4`` (measured: ~1e-5). Adam divides each update by
  the root of the squared-gradient average, so a last-bit difference in a near-zero
  gradient can move a weight by a visible fraction of ``lr`` (3e-3): the differences
  are rounding, not a different algorithm; exact equality is not to be had.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs.data import DataSpec
from optjob.specs.errors import StepError
from optjob.steps import dist
from optjob.steps.data import load_text
from optjob.steps.device import pick_device
from optjob.steps.events import parse_event
from optjob.steps.layout import JobFile, step_dir

Spec = Callable[..., dict[str, Any]]

PIPELINE: list[dict[str, Any]] = [
    {"train": {"max_steps": 10, "lr": 3e-3, "batch_size": 8, "warmup_steps": 2, "grad_clip": 1.0,
               "log_every": 1, "checkpoint_every": 4, "eval_every": 5, "eval_batches": 2}},
    {"prune": {"method": "magnitude", "sparsity": 0.3, "recover_steps": 2, "batch_size": 4}},
    {"distill": {"max_steps": 4, "lr": 3e-3, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
                 "student": {"layers": 1}}},
    {"evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 2}},
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(folder: Path, procs: int) -> list[dict[str, Any]]:
    if procs == 1:
        cmd = [sys.executable, "-m", "optjob.steps", "run", str(folder)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "optjob.steps", "run", str(folder)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [e for e in map(parse_event, proc.stdout.splitlines()) if e is not None]


def _losses(events: list[dict[str, Any]], kind: str) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in events if e["event"] == "progress" and e["kind"] == kind]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    assert out, f"no weights in {folder}"
    return out


@pytest.fixture
def job(tmp_path: Path, shared_cache: Path, tiny_spec: Spec) -> Callable[[str], Path]:
    load_text(DataSpec(), shared_cache)  # build the corpus here, not in the subprocesses

    def make(name: str) -> Path:
        folder = tmp_path / name
        quick = {"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 2}}
        JobFile(spec=tiny_spec(steps=PIPELINE), device="cpu", cache_dir=str(shared_cache),
                extra=quick).write(folder)  # fmt: skip
        return folder

    return make


@pytest.mark.slow
def test_two_processes_train_like_one(job: Callable[[str], Path]) -> None:
    one, two = job("one"), job("two")
    events1, events2 = _run(one, 1), _run(two, 2)

    # Rank 1 is silent: the event stream is the one-process stream.
    assert [e["event"] for e in events2] == [e["event"] for e in events1]
    assert events2[-1]["event"] == "job_done"
    for kind, n in (("train", 10), ("distill", 4)):
        l1, l2 = _losses(events1, kind), _losses(events2, kind)
        assert [s for s, _ in l2] == list(range(1, n + 1)) == [s for s, _ in l1]
        torch.testing.assert_close(torch.tensor([v for _, v in l2]), torch.tensor([v for _, v in l1]),
                                   rtol=1e-5, atol=0)  # fmt: skip
    for i, kind in ((0, "train"), (1, "prune"), (2, "distill")):
        w1, w2 = _weights(step_dir(one, i, kind) / "model"), _weights(step_dir(two, i, kind) / "model")
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=f"{kind}: {k}")
    evals1, evals2 = ([e["metrics"]["eval_loss"] for e in ev if e["event"] == "metrics" and e["kind"] == "train"]
                      for ev in (events1, events2))  # fmt: skip
    assert len(evals1) == 2 and evals2 == pytest.approx(evals1, rel=1e-5)  # periodic eval (rank 0)
    # Global batch semantics: the same token counts as one process.
    r1, r2 = (json.loads((f / "results.json").read_text()) for f in (one, two))
    assert r2["steps"][0]["metrics"]["tokens"] == r1["steps"][0]["metrics"]["tokens"] == 10 * 8 * 32
    assert r2["final"]["eval_loss"] == pytest.approx(r1["final"]["eval_loss"], rel=1e-4)

    # Resume on two ranks: drop everything after the step-8 checkpoint of the train step.
    for child in (two / "steps").iterdir():
        if child.name != "00-train":
            shutil.rmtree(child)
    (step_dir(two, 0, "train") / "done.json").unlink()
    shutil.rmtree(step_dir(two, 0, "train") / "model")
    (two / "results.json").unlink()
    again = _run(two, 2)
    assert _losses(again, "train") == _losses(events2, "train")[8:]  # same ranks, same sums: exact
    assert _losses(again, "distill") == _losses(events2, "distill")
    w2, w3 = (_weights(step_dir(two, 2, "distill") / "model") for _ in range(2))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


_HELPERS = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from optjob.steps import checkpoint as ckpt, dist
    from optjob.steps.context import StopFlag, StopRequested

    device = dist.init(torch.device("cpu"))
    r = dist.rank()
    assert (dist.world(), dist.is_main()) == (2, r == 0)
    assert dist.split_batch(8) == 4
    assert dist.shard(torch.arange(8)[:, None]).flatten().tolist() == [4 * r + i for i in range(4)]
    assert dist.all_reduce_mean(torch.tensor([float(r)])).item() == 0.5
    assert dist.broadcast_object({"from": r}) == {"from": 0}
    assert dist.agree_stop("deadline" if r == 1 else None) == "deadline"
    assert dist.agree_stop(None) is None
    stop = StopFlag()
    if r == 0:
        stop.request()
    try:
        dist.check_stop(stop, step=3)
        raise AssertionError("no stop")
    except StopRequested as exc:
        assert (exc.reason, exc.step) == ("signal", 3)
    assert dist.on_main(lambda: 40 + dist.rank()) == 40
    def boom():
        raise ValueError("bad")
    try:
        dist.on_main(boom)
        raise AssertionError("no error")
    except (ValueError, dist.PeerFailed) as exc:
        assert type(exc) is (ValueError if r == 0 else dist.PeerFailed) and "bad" in str(exc)
    # Each rank in its own folder: rank 1 cannot see rank 0's files (no shared disk).
    model = Path("model")
    if r == 0:
        (model / "sub").mkdir(parents=True)
        (model / "a.bin").write_bytes(b"weights")
        (model / "sub" / "b.json").write_text("{}")
        ckpt.save_checkpoint(Path("ckpt"), 4, {"x": torch.ones(2)}, {"losses": []})
    dist.ensure_folder(model)
    dist.ensure_folder(Path("ckpt/step-000004"), present=ckpt.verify)
    assert (model / "a.bin").read_bytes() == b"weights" and (model / "sub" / "b.json").read_text() == "{}"
    assert ckpt.latest_checkpoint(Path("ckpt")) == Path("ckpt/step-000004")
    dist.ensure_folder(model)  # everyone has it now: nothing to send
    dist.ensure_folder(Path("nowhere"))  # rank 0 lacks it too: nothing to send, nothing made
    assert not Path("nowhere").exists()
    dist.teardown()
    print("ok", r)
""")


def test_dist_helpers_across_two_processes(tmp_path: Path) -> None:
    """The helpers over a real 2-process gloo group, started the way torchrun would;
    the ranks run in different folders, as nodes without a shared file system."""
    port = str(_free_port())
    procs = []
    for r in (0, 1):
        cwd = tmp_path / f"node{r}"
        cwd.mkdir()
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _HELPERS], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == f"ok {r}", err[-3000:]
    assert (tmp_path / "node1" / "model" / "sub" / "b.json").exists()
    assert not list((tmp_path / "node1").glob(".recv-*"))


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cpu = torch.device("cpu")
    assert dist.init(cpu) == cpu and not dist.is_initialized()
    assert (dist.world(), dist.rank(), dist.is_main()) == (1, 0, True)
    t = torch.tensor([3.0])
    assert dist.all_reduce_mean(t) is t and t.item() == 3.0
    assert dist.broadcast_object("x") == "x" and dist.on_main(lambda: 7) == 7
    assert dist.agree_stop("signal") == "signal" and dist.agree_stop(None) is None
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, cpu) is model
    assert not dist.runs_everywhere("train")
    dist.barrier()
    dist.ensure_folder(Path("/nonexistent"))
    dist.teardown()


def test_global_batch_must_split_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dist.split_batch(8, 2) == 4 and dist.split_batch(8, 8) == 1
    with pytest.raises(StepError, match=r"batch_size 6 .*global batch.* 4 processes.*multiple of 4"):
        dist.split_batch(6, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # not initialised: world() is still 1
    assert dist.split_batch(6) == 6


def test_torchrun_variables_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(StepError, match="torchrun"):
        dist.init(torch.device("cpu"))
    assert not dist.is_initialized()


def test_other_ranks_emit_only_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setenv("RANK", "1")
    em = dist.emitter()
    assert isinstance(em, dist.RankEmitter)
    em.stream = io.StringIO()
    em.emit("progress", step=1, loss=2.0)
    em.emit("error", message="rank 0 failed: x", error_type="PeerFailed")  # rank 0 reports it
    em.emit("error", message="CUDA out of memory", error_type="OutOfMemoryError")
    events = [parse_event(line) for line in em.stream.getvalue().splitlines()]
    assert [(e["event"], e["message"], e["rank"]) for e in events if e] == [("error", "CUDA out of memory", 1)]
    monkeypatch.setenv("RANK", "0")
    assert not isinstance(dist.emitter(), dist.RankEmitter)


# --- the device choice, with the availability checks injected -----------------------

XLA = torch.device("xla", 0)


def _pick(choice: str = "auto", *, env: dict[str, str] | None = None, cuda: bool = False,
          mps: bool = False, xla: str | None = None) -> torch.device:  # fmt: skip
    """``xla``: None (torch_xla not importable), "cpu" (only XLA's CPU fallback) or "tpu"."""

    def probe(forced: bool) -> torch.device | None:
        if xla is None or (xla == "cpu" and not forced):
            return None
        return XLA

    return pick_device(choice, env=env or {}, cuda=lambda: cuda, mps=lambda: mps, xla=probe)


def test_auto_prefers_xla_then_cuda_then_mps_then_cpu() -> None:
    assert _pick() == torch.device("cpu")
    assert _pick(mps=True) == torch.device("mps")
    assert _pick(cuda=True, mps=True) == torch.device("cuda")
    assert _pick(cuda=True, xla="tpu") == XLA
    assert _pick(xla="cpu") == torch.device("cpu")  # torch_xla installed, no TPU: not XLA
    assert _pick(cuda=True, xla="cpu") == torch.device("cuda")


def test_optjob_device_stands_in_for_auto() -> None:
    assert _pick(env={"OPTJOB_DEVICE": "xla"}, xla="cpu") == XLA  # forced: any XLA device
    assert _pick(env={"OPTJOB_DEVICE": "XLA"}, xla="tpu", cuda=True) == XLA
    with pytest.raises(StepError, match="torch_xla is not installed"):
        _pick(env={"OPTJOB_DEVICE": "xla"}, cuda=True)
    assert _pick(env={"OPTJOB_DEVICE": "cpu"}, cuda=True, xla="tpu") == torch.device("cpu")
    assert _pick(env={"OPTJOB_DEVICE": "auto"}, cuda=True) == torch.device("cuda")
    assert _pick("cpu", env={"OPTJOB_DEVICE": "xla"}, xla="tpu") == torch.device("cpu")  # job.json wins


def test_forced_devices_must_exist() -> None:
    assert _pick("xla", xla="tpu") == XLA
    assert _pick("cuda:1", cuda=True) == torch.device("cuda", 1)
    with pytest.raises(StepError, match="no CUDA device"):
        _pick("cuda", xla="tpu")
    with pytest.raises(StepError, match="no MPS device"):
        _pick("mps", cuda=True)
    with pytest.raises(StepError, match="torch_xla"):
        _pick("xla", cuda=True)
    with pytest.raises(StepError, match="unknown device"):
        _pick("tpu9")


def test_without_torch_xla_the_probe_finds_nothing() -> None:
    import importlib.util

    from optjob.steps.device import _xla_device

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed: this host may really have an XLA device")
    assert _xla_device(False) is None and _xla_device(True) is None
