"""bf16 training through optjob's ``train_loop``, and its throughput against ``transformers.Trainer``
on the same model, windows, batch, optimizer and precision (interleaved segments)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .bench import Bench
from .harness import CheckFailed, need_module


def _step_seconds(stamps: list[float], warm: int) -> list[float]:
    """Durations of the steps after the first ``warm`` (stamps are taken at each step's end)."""
    return [b - a for a, b in zip(stamps[warm - 1 :], stamps[warm:], strict=False)] if warm >= 1 else []


def bf16_train(b: Bench, out: dict[str, Any]) -> None:
    """``train_loop`` with ``precision: bf16``: the loss is finite and falls; tokens/s."""
    from optjob.steps.modeling import save_model
    from optjob.steps.train import train_loop

    steps = b.sizes.train_steps
    spec = b.spec([{"train": b.train_options(max_steps=steps, precision="bf16")}])
    stamps: list[float] = []
    res = train_loop(b.context(spec, "bf16-train"), b.model(), spec.pipeline[0], checkpoints=False, emit=False,
                     after_step=lambda _m: stamps.append(b.stamp()))
    losses = [v for _, v in res.losses]
    k = max(1, min(5, len(losses) // 4))
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    durations = _step_seconds(stamps, min(10, steps // 3))
    per_step = statistics.median(durations) if durations else float("nan")
    tokens_per_s = b.tokens_per_step() / per_step
    params = sum(p.numel() for p in res.model.parameters())
    out.update(figure=round(tokens_per_s, 1), unit="tokens/s (median step, device synchronised)",
               goal="loss finite and decreasing", metrics={
                   "params": params, "steps": res.steps_done, "loss_first": first, "loss_last": last,
                   "loss_curve": [round(v, 4) for v in losses], "tokens_per_s_loop": round(res.tokens_per_s, 1),
                   "median_step_ms": round(per_step * 1e3, 3), "weights_dtype": getattr(res, "weights_dtype", None),
                   "tokens_per_step": b.tokens_per_step()})
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"a loss is not finite: {losses}")
    out["met"] = last < first
    if not last < first:
        raise CheckFailed(f"the loss did not decrease: mean of the first {k} steps {first:.4f}, of the last {last:.4f}")
    save_model(res.model, b.trained_dir)


def _segment(b: Bench, side: str, steps: int, warm: int) -> list[float]:
    """Step durations (after ``warm``) of one fresh segment of ``side`` on a fresh model."""
    import torch

    model = b.model()
    stamps: list[float] = []
    if side == "optjob":
        from optjob.steps.train import train_loop

        spec = b.spec([{"train": b.train_options(max_steps=steps, precision="bf16", lr=1e-3)}])
        train_loop(b.context(spec, "throughput"), model, spec.pipeline[0], checkpoints=False, emit=False,
                   after_step=lambda _m: stamps.append(b.stamp()))
    else:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        batch = b.sizes.batch
        windows = torch.cat([b.corpus.train_batch(batch, s, 0) for s in range(steps)])[:, :-1].contiguous()

        class Windows(torch.utils.data.Dataset):  # type: ignore[type-arg]
            def __len__(self) -> int:
                return len(windows)

            def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
                return {"input_ids": windows[i], "labels": windows[i]}

        class Stamp(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                stamps.append(b.stamp())

        args = TrainingArguments(
            output_dir=str(b.tmp / "hf"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
            warmup_steps=min(10, steps), lr_scheduler_type="cosine", adam_beta1=0.9, adam_beta2=0.95,
            weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=not b.cuda, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            dataloader_pin_memory=b.cuda, seed=0)
        Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Stamp()]).train()
    if len(stamps) != steps:
        raise RuntimeError(f"{side}: {len(stamps)} step stamps for {steps} steps")
    del model
    b.cleanup()
    return _step_seconds(stamps, warm)


def trainer_throughput(b: Bench, out: dict[str, Any]) -> None:
    """optjob tokens/s / Trainer tokens/s, bf16, median step times over interleaved segments."""
    need_module("accelerate")  # Trainer's own requirement
    steps, warm, rounds = b.sizes.trainer_steps, b.sizes.trainer_warm, b.sizes.trainer_rounds
    out.update(unit="optjob tokens/s / Trainer tokens/s (bf16)", goal=">= 1.0")
    for side in ("optjob", "trainer"):  # untimed: allocator, kernel caches, autotuning
        _segment(b, side, warm + 2, warm)
    times: dict[str, list[float]] = {"optjob": [], "trainer": []}
    per_round: dict[str, list[float]] = {"optjob": [], "trainer": []}
    for r in range(rounds):
        for side in (("optjob", "trainer") if r % 2 == 0 else ("trainer", "optjob")):
            seconds = _segment(b, side, steps, warm)
            times[side] += seconds
            per_round[side].append(b.tokens_per_step() / statistics.median(seconds))
    tps = {side: b.tokens_per_step() / statistics.median(v) for side, v in times.items()}
    ratio = tps["optjob"] / tps["trainer"]
    spread = max(max(v) / min(v) - 1 for v in per_round.values())
    out.update(figure=round(ratio, 4), met=ratio >= 1.0, metrics={
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "tokens_per_s_per_round": {k: [round(x, 1) for x in v] for k, v in per_round.items()},
        "spread": round(spread, 4), "timed_steps_per_segment": steps - warm, "rounds": rounds,
        "tokens_per_step": b.tokens_per_step()})
