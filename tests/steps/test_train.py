"""The training loop: learning, exact resume, checkpoints, optimizers, early stopping."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.specs import TrainOptions, TrainStep
from optjob.steps import checkpoint as ckpt
from optjob.steps.context import StopRequested
from optjob.steps.modeling import initial_model
from optjob.steps.train import Schedule, make_optimizer, run, train_loop

MakeCtx = Callable[..., Any]


def _setup(make_ctx: MakeCtx, tiny_spec: Callable[..., dict[str, Any]], dropout: float = 0.0) -> Any:
    spec = tiny_spec(model={"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128,
                                     "vocab": 512, "dropout": dropout}})  # fmt: skip
    return make_ctx(spec)


def _fresh(ctx: Any) -> torch.nn.Module:
    return initial_model(ctx.spec, ctx.tokenizer)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=k)


def test_loss_falls_and_events_flow(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    ctx = _setup(make_ctx, tiny_spec)
    opts = TrainStep(max_steps=20, lr=3e-3, warmup_steps=2, log_every=5, checkpoint_every=10)
    out = run(ctx, opts, _fresh(ctx))
    losses = [v for _, v in out.extra["loss_curve"]]
    assert len(losses) == 20
    assert math.log(512) - 0.5 < losses[0] < math.log(512) + 0.5
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert out.metrics["steps"] == 20 and out.metrics["tokens"] == 20 * 8 * 32
    assert out.metrics["tokens_per_s"] > 0
    events = ctx.events()
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [5, 10, 15, 20]
    for e in progress:
        assert {"index", "kind", "max_steps", "loss", "lr", "tokens", "tokens_per_s"} <= e.keys()
        assert e["kind"] == "train" and e["index"] == 0
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [10]
    assert (ctx.step_dir() / "checkpoints" / "step-000010" / "manifest.json").exists()


def test_resume_after_stop_equals_straight_run(
    make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path
) -> None:
    ctx = _setup(make_ctx, tiny_spec, dropout=0.1)  # dropout: RNG must resume exactly too
    opts = TrainOptions(max_steps=12, lr=3e-3, warmup_steps=3, checkpoint_every=4, grad_accum=2,
                        log_every=5)  # fmt: skip
    straight = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "a")

    steps = 0

    def stop_at_7(model: torch.nn.Module) -> None:
        nonlocal steps
        steps += 1
        if steps == 7:
            ctx.stop.request()

    with pytest.raises(StopRequested) as info:
        train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b", after_step=stop_at_7)
    assert info.value.reason == "signal" and info.value.step == 7
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["step-000007", "step-000004"]

    ctx.stop.signalled = False
    resumed = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 7 and resumed.steps_done == 12
    _same_weights(straight.model, resumed.model)
    assert resumed.losses == straight.losses
    assert len(resumed.losses) == 12


def test_corrupt_newest_checkpoint_falls_back(
    make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path
) -> None:
    ctx = _setup(make_ctx, tiny_spec)
    opts = TrainOptions(max_steps=8, lr=3e-3, checkpoint_every=2)
    straight = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=tmp_path / "a")
    root = tmp_path / "a"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000006", "step-000004"]
    model_file = root / "step-000006" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    (root / ".tmp-half-written").mkdir()  # a writer killed mid-way leaves one of these
    assert ckpt.latest_checkpoint(root) == root / "step-000004"
    resumed = train_loop(ctx, _fresh(ctx), opts, checkpoint_dir=root)
    assert resumed.resumed_from == 4
    _same_weights(straight.model, resumed.model)


def test_partial_checkpoint_without_manifest_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "c"
    ckpt.save_checkpoint(root, 2, {"x": torch.ones(3)}, {"losses": []})
    ckpt.save_checkpoint(root, 4, {"x": torch.zeros(3)}, {"losses": []})
    (root / "step-000004" / "manifest.json").unlink()
    found = ckpt.latest_checkpoint(root)
    assert found == root / "step-000002"
    parts, meta = ckpt.load_checkpoint(found)
    assert torch.equal(parts["x"], torch.ones(3)) and meta["step"] == 2


@pytest.mark.parametrize(
    ("optimizer", "schedule", "precision"),
    [("adamw", "cosine", "fp32"), ("sgd", "linear", "bf16"), ("rmsprop", "constant", "fp16")],
)
def test_each_optimizer_and_schedule_runs(
    make_ctx: MakeCtx, tiny_spec: Any, optimizer: str, schedule: str, precision: str
) -> None:
    ctx = _setup(make_ctx, tiny_spec)
    lr = {"adamw": 3e-3, "sgd": 0.1, "rmsprop": 1e-3}[optimizer]
    opts = TrainOptions(max_steps=4, lr=lr, optimizer=optimizer, schedule=schedule,  # type: ignore[arg-type]
                        precision=precision, warmup_steps=1, weight_decay=0.1, log_every=1)  # type: ignore[arg-type]  # fmt: skip
    res = train_loop(ctx, _fresh(ctx), opts, checkpoints=False)
    assert res.steps_done == 4 and all(math.isfinite(v) for _, v in res.losses)
    lrs = [e["lr"] for e in ctx.events() if e["event"] == "progress"]
    if schedule == "constant":
        assert lrs == pytest.approx([lr] * 4)
    else:
        assert lrs[0] == pytest.approx(lr) and lrs[-1] == pytest.approx(0.0)


def test_adamw_is_fused_where_torch_has_the_kernel() -> None:
    opts = TrainOptions(weight_decay=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, opts)
    assert opt.defaults["fused"] is True  # CPU float32: Trainer's default (adamw_torch_fused) too
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # decay on matrices only
    assert make_optimizer(model.to(torch.float64), opts).defaults["fused"] is True
    assert make_optimizer(model.to("meta"), opts).defaults["fused"] is None  # no kernel: torch picks


def test_schedule_shapes() -> None:
    cos = Schedule("cosine", warmup=4, total=14)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == 1.0 and cos(9) == pytest.approx(0.5) and cos(14) == pytest.approx(0.0)
    lin = Schedule("linear", warmup=0, total=10)
    assert lin(0) == 1.0 and lin(5) == 0.5 and lin(10) == 0.0
    assert Schedule("constant", warmup=2, total=10)(7) == 1.0


def test_early_stopping_stops(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    ctx = _setup(make_ctx, tiny_spec)
    reported: list[tuple[int, float]] = []
    opts = TrainOptions(max_steps=50, lr=3e-3, eval_every=2, eval_batches=2,
                        early_stopping={"patience": 2, "min_delta": 5.0})  # type: ignore[arg-type]  # fmt: skip
    res = train_loop(ctx, _fresh(ctx), opts, checkpoints=False,
                     report=lambda s, v: reported.append((s, v)))  # fmt: skip
    assert res.early_stopped and res.steps_done == 6  # best at 2, no 5.0 gain at 4 and 6
    assert [s for s, _ in reported] == [2, 4, 6] and res.evals == reported
    assert res.best_eval_loss == reported[0][1]
    metrics = [e for e in ctx.events() if e["event"] == "metrics"]
    assert len(metrics) == 3 and metrics[0]["metrics"]["perplexity"] == pytest.approx(
        math.exp(metrics[0]["metrics"]["eval_loss"])
    )


def test_stop_without_checkpoints_can_return(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    ctx = _setup(make_ctx, tiny_spec)
    ctx.stop.request()
    res = train_loop(ctx, _fresh(ctx), TrainOptions(max_steps=5), checkpoints=False,
                     on_stop="return")  # fmt: skip
    assert res.stopped == "signal" and res.steps_done == 0
    assert not (ctx.step_dir() / "checkpoints").exists()


def test_deadline_trips_early(make_ctx: MakeCtx, tiny_spec: Any, tmp_path: Path) -> None:
    import time

    from optjob.steps.context import StopFlag

    ctx = _setup(make_ctx, tiny_spec)
    ctx.stop = StopFlag(deadline=time.time() + 5, margin=4.0)
    assert ctx.stop.reason() is None
    ctx.stop.observe(1.0)  # a 1 s step must fit, twice over, before the deadline
    assert ctx.stop.reason() == "deadline"
    with pytest.raises(StopRequested) as info:
        train_loop(ctx, _fresh(ctx), TrainOptions(max_steps=5), checkpoint_dir=tmp_path / "d")
    assert info.value.reason == "deadline"


def test_diverging_loss_is_a_clear_error(make_ctx: MakeCtx, tiny_spec: Any) -> None:
    from optjob.specs.errors import StepError

    ctx = _setup(make_ctx, tiny_spec)

    def nan_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch[:, :-1]).logits.sum() * float("nan")

    with pytest.raises(StepError, match="diverged"):
        train_loop(ctx, _fresh(ctx), TrainOptions(max_steps=3, log_every=1), loss_fn=nan_loss,
                   checkpoints=False)  # fmt: skip
