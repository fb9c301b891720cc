"""What every check shares: the sizes (an H200 run or the CPU smoke run), the device, the builtin
corpus and tokenizer, specs and step contexts built the way the workload builds them."""

from __future__ import annotations

import gc
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import Skip

if TYPE_CHECKING:
    import torch
    from optjob.specs import JobSpec
    from optjob.steps.context import StepContext
    from torch import nn


@dataclass(frozen=True)
class Sizes:
    """How big the model and how long each check runs."""

    init: dict[str, Any]
    seq_len: int
    max_chars: int | None
    batch: int
    train_steps: int
    lr: float
    trainer_steps: int
    trainer_warm: int
    trainer_rounds: int
    memory_steps: int
    qlora_steps: int
    group_size: int
    calibration_samples: int
    eval_batches: int


#: On the GPU: a 12 x 1024 Llama (about 168M parameters with the 8192-token builtin vocabulary), seq 512,
#: batch 8 (4,096 tokens a step); the whole builtin corpus (CPython's docs, about 1.7M characters).
GPU = Sizes(
    init={"family": "llama", "layers": 12, "hidden": 1024, "heads": 16, "intermediate": 2816, "vocab": 8192},
    seq_len=512, max_chars=None, batch=8, train_steps=60, lr=6e-4, trainer_steps=30, trainer_warm=10,
    trainer_rounds=2, memory_steps=3, qlora_steps=10, group_size=128, calibration_samples=64, eval_batches=8,
)  # fmt: skip
#: ``--cpu-smoke``: the workload tests' tiny model (2 x 64, vocab 512, seq 32) on 200k characters.
SMOKE = Sizes(
    init={"family": "llama", "layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 512},
    seq_len=32, max_chars=200_000, batch=8, train_steps=30, lr=3e-3, trainer_steps=8, trainer_warm=2,
    trainer_rounds=1, memory_steps=2, qlora_steps=2, group_size=32, calibration_samples=16, eval_batches=4,
)  # fmt: skip


class Bench:
    """The device, corpus and tokenizer (built once), and the specs, contexts and models the checks use."""

    def __init__(self, sizes: Sizes, device: torch.device, cache: Path, tmp: Path) -> None:
        from optjob.steps.data import build_corpus, load_text
        from optjob.steps.tokenizer import load_tokenizer

        self.sizes, self.device, self.cache, self.tmp = sizes, device, cache, tmp
        spec = self.spec([{"train": {}}])
        text = load_text(spec.data, cache)
        self.tokenizer = load_tokenizer(spec, text, cache)
        self.corpus = build_corpus(spec, self.tokenizer, cache, dry_run=False, text=text)
        self.trained_dir = tmp / "trained"  # bf16_train's model, for the quantize checks

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("no CUDA")

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": "builtin:python-docs", "seq_len": self.sizes.seq_len}
        if self.sizes.max_chars is not None:
            data["max_chars"] = self.sizes.max_chars
        return data

    def spec(self, steps: list[dict[str, Any]]) -> JobSpec:
        from optjob.specs import JobSpec

        return JobSpec.model_validate({"name": "gpu-check", "model": {"init": self.sizes.init}, "data": self.data(),
                                       "steps": steps})

    def train_options(self, **overrides: Any) -> dict[str, Any]:
        steps = int(overrides.get("max_steps", self.sizes.train_steps))
        return {"max_steps": steps, "lr": self.sizes.lr, "batch_size": self.sizes.batch,
                "warmup_steps": min(10, steps), "seed": 0, "log_every": min(10, steps), **overrides}

    def context(self, spec: JobSpec, job: str, index: int = 0) -> StepContext:
        from optjob.steps.context import StepContext, StopFlag
        from optjob.steps.events import Emitter

        return StepContext(spec=spec, job_dir=self.tmp / job, index=index, emitter=Emitter(io.StringIO()),
                           device=self.device, dry_run=False, corpus=self.corpus, tokenizer=self.tokenizer,
                           stop=StopFlag(), cache_dir=self.cache)

    def model(self, seed: int = 0) -> nn.Module:
        """A fresh fp32 model on the CPU, built from the config (the train step moves it to the device)."""
        from optjob.specs.model import ModelInit
        from optjob.steps.modeling import build_model

        init = ModelInit.model_validate(self.sizes.init)
        return build_model(init, init.vocab, seed)

    def trained_or_fresh(self) -> tuple[nn.Module, str]:
        """bf16_train's model if it saved one, else a fresh one; on the device."""
        from optjob.steps.modeling import load_model

        if (self.trained_dir / "config.json").exists():
            return load_model(self.trained_dir, self.device), "bf16_train's model"
        return self.model().to(self.device), "a fresh model (bf16_train saved none)"

    def eval_loss(self, model: nn.Module) -> float:
        from optjob.steps.evaluate import eval_loss

        return eval_loss(model, self.corpus, self.sizes.batch, self.sizes.eval_batches, self.device)[0]

    def stamp(self) -> float:
        """Now, after the device finished what was queued."""
        self.synchronize()
        return time.perf_counter()

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def tokens_per_step(self) -> int:
        return self.sizes.batch * self.sizes.seq_len
