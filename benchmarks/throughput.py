"""4. Training throughput: optjob's ``train_loop`` against Hugging Face ``Trainer`` on the same
model, data, batch, optimizer and precision, in one process, interleaved."""

from __future__ import annotations

import gc
import io
import time
from pathlib import Path
from typing import Any

from .common import PYTHON, Ctx, base_env, last_json, median, pair_ratios, run_cmd, small_spec, warm_cache, write_spec

NAME = "throughput"
TITLE = "Training throughput"
MEASURES = ("Training tokens/s of optjob's `train_loop` (steps/train.py) against `transformers.Trainer` on the "
            "same freshly initialised Llama, the same token windows, batch 8, AdamW as each defaults to (fused on "
            "both: Trainer's default `optim` on torch >= 2.8 is `adamw_torch_fused`, optjob uses the fused kernel on "
            "CPU and CUDA; betas 0.9/0.95), cosine schedule with warm-up, grad clip 1.0, fp32 and bf16 "
            "autocast on CPU; same step count, the first steps of each segment excluded, tokens/s from the median "
            "step time, one untimed segment of each first, then segments interleaved "
            "(optjob, Trainer, Trainer, optjob, ...), in one process with one torch thread. Headline: tokens per "
            "CPU-second of the training thread (robust to other work on shared cores); wall-time ratio beside it.")
GOAL = "optjob tokens/s / Trainer tokens/s >= 1.0 (fp32 and bf16)"


def _segment(side: str, precision: str, setup: dict[str, Any], steps: int, warm: int,
             tmp: Path) -> dict[str, float]:
    """Tokens/s of one fresh training segment: batch tokens / the median duration of steps
    ``warm+1 .. steps``, in CPU time of this (the only compute) thread and in wall time."""
    import torch
    from optjob.specs import TrainStep
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.events import Emitter
    from optjob.steps.modeling import build_model

    spec, corpus, tok = setup["spec"], setup["corpus"], setup["tokenizer"]
    batch, seq = setup["batch"], corpus.seq_len
    model = build_model(spec.model.init, len(tok), 0)
    stamps: list[tuple[float, float]] = []

    def stamp() -> None:
        stamps.append((time.thread_time(), time.perf_counter()))

    if side == "optjob":
        from optjob.steps.train import train_loop

        ctx = StepContext(spec=spec, job_dir=tmp, index=0, emitter=Emitter(io.StringIO()),
                          device=torch.device("cpu"), dry_run=False, corpus=corpus, tokenizer=tok, stop=StopFlag())
        opts = TrainStep(max_steps=steps, lr=1e-3, batch_size=batch, warmup_steps=min(10, steps), seed=0,
                         precision=precision)
        train_loop(ctx, model, opts, emit=False, checkpoints=False,
                   after_step=lambda _m: stamp())
    else:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        windows = torch.cat([corpus.train_batch(batch, s, 0) for s in range(steps)])[:, :-1].contiguous()

        class Windows(torch.utils.data.Dataset):  # type: ignore[type-arg]
            def __len__(self) -> int:
                return len(windows)

            def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
                return {"input_ids": windows[i], "labels": windows[i]}

        class Stamp(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                stamp()

        args = TrainingArguments(
            output_dir=str(tmp / "hf"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
            warmup_steps=min(10, steps), lr_scheduler_type="cosine", adam_beta1=0.9, adam_beta2=0.95,
            weight_decay=0.0, max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=True,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
        Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Stamp()]).train()
    if len(stamps) != steps:
        raise RuntimeError(f"{side}: {len(stamps)} step stamps for {steps} steps")
    del model
    gc.collect()
    tokens = batch * seq
    return {clock: tokens / median([b[i] - a[i] for a, b in zip(stamps[warm - 1:], stamps[warm:], strict=False)])
            for i, clock in enumerate(("cpu", "wall"))}


def measure(quick: bool, tmp: str) -> dict[str, Any]:
    """Runs in a child process (``python -m benchmarks.throughput``): torch stays out of the suite."""
    import torch
    from optjob.specs import load_spec
    from optjob.steps.data import build_corpus, load_text
    from optjob.steps.layout import JobFile
    from optjob.steps.runner import cache_dir
    from optjob.steps.tokenizer import load_tokenizer

    # One intra-op thread on both sides: other people's work on these shared cores then slows each
    # step in proportion, instead of stalling OpenMP barriers at random; and all the compute runs on
    # this thread, so its CPU time per step is a clock that contention barely moves.
    torch.set_num_threads(1)
    threads = torch.get_num_threads()
    spec_path, steps, warm, rounds = tmp_spec(Path(tmp), quick)
    spec = load_spec(spec_path)
    cache = cache_dir(JobFile(spec={}))
    text = load_text(spec.data, cache)
    tok = load_tokenizer(spec, text, cache)
    setup = {"spec": spec, "tokenizer": tok, "corpus": build_corpus(spec, tok, cache, dry_run=False, text=text),
             "batch": 8}
    out: dict[str, Any] = {"threads": threads, "steps": steps, "warmup_steps_excluded": warm, "rounds": rounds,
                           "model": spec.model.init.model_dump(include={"layers", "hidden", "heads", "intermediate",
                                                                         "vocab"}),
                           "seq_len": spec.data.seq_len, "batch": 8, "trainer_optim": _trainer_default_optim(tmp)}
    for precision in ("fp32", "bf16"):
        # An untimed segment of each side first (allocator, kernel caches), then rounds in
        # alternating order (optjob, Trainer; Trainer, optjob; ...) so neither side always goes first.
        for side in ("optjob", "trainer"):
            _segment(side, precision, setup, warm + 2, warm, Path(tmp))
        tps: dict[str, dict[str, list[float]]] = {"optjob": {"cpu": [], "wall": []},
                                                  "trainer": {"cpu": [], "wall": []}}
        for r in range(rounds):
            for side in (("optjob", "trainer") if r % 2 == 0 else ("trainer", "optjob")):
                for clock, value in _segment(side, precision, setup, steps, warm, Path(tmp)).items():
                    tps[side][clock].append(value)
        out[precision] = {
            "tokens_per_cpu_s": {k: median(v["cpu"]) for k, v in tps.items()},
            "tokens_per_s": {k: median(v["wall"]) for k, v in tps.items()},
            "raw": tps,
            "ratio": median(tps["optjob"]["cpu"]) / median(tps["trainer"]["cpu"]),
            "ratio_wall": median(tps["optjob"]["wall"]) / median(tps["trainer"]["wall"]),
            "ratio_per_round_median": median(pair_ratios(tps["optjob"]["cpu"], tps["trainer"]["cpu"])),
            # How far one side's own rounds differ: the noise floor for the ratio.
            "spread": max((max(v["cpu"]) / min(v["cpu"]) - 1) for v in tps.values()),
        }
    return out


def _trainer_default_optim(tmp: str) -> str:
    from transformers import TrainingArguments

    optim = TrainingArguments(output_dir=str(Path(tmp) / "hf"), use_cpu=True, report_to="none").optim
    return str(getattr(optim, "value", optim))


def tmp_spec(folder: Path, quick: bool) -> tuple[Path, int, int, int]:
    if quick:
        return write_spec(folder, "bench-throughput", small_spec("bench-throughput", steps=10)), 20, 5, 1
    text = small_spec("bench-throughput", steps=10, layers=2, hidden=256, seq_len=128)
    return write_spec(folder, "bench-throughput", text), 24, 8, 4


def run(ctx: Ctx) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        return {"summary": "not measured: transformers.Trainer needs accelerate (pip install -e '.[bench]')",
                "met": None, "metrics": {}, "notes": []}
    tmp = ctx.mkdtemp("throughput-")
    warm_cache(tmp_spec(tmp, ctx.quick)[0])
    args = [PYTHON, "-m", "benchmarks.throughput", str(tmp)] + (["--quick"] if ctx.quick else [])
    _, proc = run_cmd(args, env=base_env(), timeout=1200)
    m = last_json(proc.stdout)
    fp, bf = m["fp32"], m["bf16"]
    summary = (f"optjob / Trainer tokens per CPU-second: fp32 {fp['ratio']:.2f} "
               f"({fp['tokens_per_cpu_s']['optjob']:,.0f} vs {fp['tokens_per_cpu_s']['trainer']:,.0f}), bf16 "
               f"{bf['ratio']:.2f} ({bf['tokens_per_cpu_s']['optjob']:,.0f} vs "
               f"{bf['tokens_per_cpu_s']['trainer']:,.0f}); by wall time fp32 {fp['ratio_wall']:.2f}, bf16 "
               f"{bf['ratio_wall']:.2f}; {m['model']['layers']}x{m['model']['hidden']} Llama, "
               f"seq {m['seq_len']}, batch {m['batch']}, {m['steps'] - m['warmup_steps_excluded']} timed steps x "
               f"{m['rounds']} round(s), {m['threads']} thread, Trainer optim {m.get('trainer_optim', '?')}; "
               f"a side's own rounds differ by up to "
               f"{max(fp.get('spread', 0), bf.get('spread', 0)):.1%}")
    # Equal within noise counts: the two loops run the same kernels.
    met = None if ctx.quick else fp["ratio"] >= 0.98 and bf["ratio"] >= 0.98  # --quick: 15 steps, too few
    return {"summary": summary, "met": met, "metrics": m,
            "notes": ["one torch thread, ratios from per-step CPU time of the training thread "
                      "(the wall-time ratio is shown beside it); 'met' allows 2% for noise"]}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure("--quick" in sys.argv[2:], sys.argv[1])))
