"""Sharded training (``train.strategy: fsdp``, torch's ``fully_shard``) on the CPU over gloo.

The same tiny train step runs as one process and as two under torchrun. Two FSDP ranks each train
on 2 of the 4 rows of each of 2 micro-batches and reduce-scatter (average) the gradients after each:
the gradient of the mean loss one process computes, summed in another order. So per-step losses
agree to ``rtol=1e-5`` and final weights to ``atol=1e-4`` (the tolerances, and why, of ``test_ddp.py``).

Checkpoints are full and unsharded (the format one process writes), so a run stopped after one
resumes on another number of processes: 2 -> 1 and 1 -> 2 end where a straight run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import JobSpec
from optjob.specs.data import DataSpec
from optjob.steps import fsdp
from optjob.steps.data import load_text
from optjob.steps.events import parse_event
from optjob.steps.layout import JobFile, step_dir

Spec = Callable[..., dict[str, Any]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(folder: Path, procs: int) -> list[dict[str, Any]]:
    """The workload on ``folder`` as one process, or ``procs`` under torchrun (as test_ddp.py runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_") and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "optjob.steps", "run", str(folder)]
    if procs > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), "-m"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
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

TRAIN: dict[str, Any] = {"max_steps": 6, "lr": 3e-3, "batch_size": 4, "grad_accum": 2, "warmup_steps": 1,
                         "grad_clip": 1.0, "log_every": 1, "checkpoint_every": 4, "eval_every": 3, "eval_batches": 2,
                         "strategy": "fsdp"}  # fmt: skip


@pytest.fixture
def job(tmp_path: Path, shared_cache: Path, tiny_spec: Spec) -> Callable[[str], Path]:
    load_text(DataSpec(), shared_cache)  # build the corpus here, not in the subprocesses

    def make(name: str) -> Path:
        folder = tmp_path / name
        quick = {"auto_evaluate": {"metrics": ["perplexity"], "max_batches": 2}, "evaluate_each_step": False}
        spec = tiny_spec(steps=[{"train": TRAIN}])
        spec["model"]["init"]["tie_embeddings"] = True  # the output head is the embedding: sharded once, tied again
        JobFile(spec=spec, device="cpu", cache_dir=str(shared_cache), extra=quick).write(folder)
        return folder

    return make


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every leaf of nested dicts and lists."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, (*path, i))]
    return [(path, obj)]


def _back_to_checkpoint(folder: Path) -> None:
    """Undo everything after the train step's last checkpoint (step 4): as if stopped there."""
    train = step_dir(folder, 0, "train")
    (train / "done.json").unlink()
    shutil.rmtree(train / "model")
    (folder / "results.json").unlink()
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == ["step-000004"]


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    torch.testing.assert_close(torch.tensor([v for _, v in a]), torch.tensor([v for _, v in b]), rtol=1e-5, atol=0)


def _same_weights(a: Path, b: Path) -> None:
    w1, w2 = _weights(a), _weights(b)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.slow
def test_two_sharded_processes_train_like_one_and_resume_on_other_counts(job: Callable[[str], Path]) -> None:
    from transformers import AutoModelForCausalLM

    one, two = job("one"), job("two")
    events1, events2 = _run(one, 1), _run(two, 2)
    l1, l2 = _losses(events1, "train"), _losses(events2, "train")
    assert [s for s, _ in l1] == list(range(1, 7))
    _close(l2, l1)
    evals1, evals2 = ([e["metrics"]["eval_loss"] for e in ev if e["event"] == "metrics" and e["kind"] == "train"]
                      for ev in (events1, events2))  # fmt: skip
    assert len(evals1) == 2 and evals2 == pytest.approx(evals1, rel=1e-5)  # every rank evaluates, rank 0 reports
    out1, out2 = step_dir(one, 0, "train") / "model", step_dir(two, 0, "train") / "model"
    _same_weights(out1, out2)
    # The sharded run's output is a plain model folder, its tied weights tied.
    loaded = AutoModelForCausalLM.from_pretrained(out2)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    r1, r2 = (json.loads((f / "results.json").read_text())["steps"][0]["metrics"] for f in (one, two))
    assert (r1["strategy"], r2["strategy"]) == ("single", "fsdp")
    assert r2["tokens"] == r1["tokens"] == 6 * 4 * 2 * 32
    # The checkpoint two sharded ranks wrote is the one one process writes: same keys, same shapes.
    c1, c2 = (step_dir(f, 0, "train") / "checkpoints" / "step-000004" for f in (one, two))
    for part in ("model", "optimizer"):
        leaves1, leaves2 = (dict(_leaves(torch.load(c / f"{part}.pt", weights_only=False))) for c in (c1, c2))
        assert leaves1.keys() == leaves2.keys()
        for key, x in leaves1.items():
            y = leaves2[key]
            if isinstance(x, torch.Tensor):
                assert type(y) is torch.Tensor and x.shape == y.shape, key  # full tensors, not shards
                torch.testing.assert_close(y, x, atol=1e-4, rtol=0, msg=str(key))
            else:
                assert y == x, key

    # Stopped after the step-4 checkpoint: 2 processes' checkpoint resumed by 1, and 1's by 2.
    _back_to_checkpoint(two)
    _back_to_checkpoint(one)
    again1, again2 = _run(two, 1), _run(one, 2)
    _close(_losses(again1, "train"), l2[4:])
    _close(_losses(again2, "train"), l1[4:])
    _same_weights(out1, out2)  # both resumed runs end where the straight ones did
    _same_weights(out1, step_dir(two, 0, "train") / "model")


def test_optimizer_state_converts_between_index_and_name() -> None:
    """torch's name-keyed full optimizer state <-> the index-keyed one a single process saves."""
    names = [["model.embed_tokens.weight", "lm_head.weight"], ["model.norm.weight"]]
    saved = {"state": {0: {"step": 3}, 1: {"step": 4}},
             "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1]}]}  # fmt: skip
    named = fsdp.by_name(saved, names)
    assert named == {"state": {"model.embed_tokens.weight": {"step": 3}, "model.norm.weight": {"step": 4}},
                     "param_groups": [{"lr": 0.1, "params": ["model.embed_tokens.weight"]},
                                      {"lr": 0.2, "params": ["model.norm.weight"]}]}  # fmt: skip
    assert fsdp.indexed(named, names) == saved
    # A tied parameter may come back under any of its names.
    tied = {"state": {"lm_head.weight": {"step": 3}}, "param_groups": [{"lr": 0.1, "params": ["lm_head.weight"]}]}
    assert fsdp.indexed(tied, names) == {"state": {0: {"step": 3}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def test_blocks_are_the_transformer_layers(tiny_spec: Spec) -> None:
    from optjob.steps.modeling import build_model

    init = JobSpec.model_validate(tiny_spec()).model.init
    assert init is not None
    model = build_model(init.model_copy(update={"tie_embeddings": True}), 512)
    assert fsdp.blocks(model) == list(model.model.layers)
    plain = fsdp.shell(model)
    assert all(p.is_meta for p in plain.parameters())
    assert all(not b.is_meta for b in plain.buffers())
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


@pytest.mark.parametrize(("step", "message"), [
    ({"distill": {"strategy": "fsdp"}}, "not supported by distill"),
    ({"train": {"strategy": "fsdp", "adapter": {"method": "lora"}}}, "not supported with an adapter"),
    ({"train": {"strategy": "fsdp", "precision": "fp16"}}, "use bf16"),
])  # fmt: skip
def test_fsdp_refuses_what_it_does_not_shard(tiny_spec: Spec, step: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(tiny_spec(steps=[step]))
    JobSpec.model_validate(tiny_spec(steps=[{"train": {"strategy": "fsdp", "precision": "bf16"}}]))
