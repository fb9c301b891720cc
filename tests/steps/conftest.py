"""Fixtures for the workload tests: a tiny spec, a shared corpus cache, a step context.

Tiny means 2 layers, 64 wide, vocab 512, seq_len 32, a 200k-character slice of the
builtin corpus; a training step takes milliseconds on a laptop CPU."""

from __future__ import annotations

import copy
import io
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast, never hang
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models run faster on one thread

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"init": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 512}},
    "data": {"source": "builtin:python-docs", "seq_len": 32, "max_chars": 200_000},
    "steps": [
        {"train": {"max_steps": 20, "lr": 3e-3, "batch_size": 8, "checkpoint_every": 8}},
        {"evaluate": {"latency_repeats": 2, "generate_tokens": 8, "max_batches": 8}},
    ],
}


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Two shared cores: a second intra-op thread makes tiny models ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by every test: the builtin corpus is built once."""
    return tmp_path_factory.mktemp("optjob-cache")


@pytest.fixture
def tiny_spec() -> Callable[..., dict[str, Any]]:
    """``tiny_spec(steps=[...], **top_level_overrides)``: a fresh tiny spec dict."""

    def make(steps: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
        spec = copy.deepcopy(TINY_SPEC)
        if steps is not None:
            spec["steps"] = steps
        for key, value in overrides.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
        return spec

    return make


@pytest.fixture
def make_ctx(shared_cache: Path, tmp_path: Path) -> Callable[..., Any]:
    """``make_ctx(spec_dict, index=0)``: a StepContext on the CPU; ``ctx.events()`` lists
    the events it emitted."""
    import torch
    from optjob.specs import JobSpec
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.data import build_corpus, load_text
    from optjob.steps.events import Emitter
    from optjob.steps.tokenizer import load_tokenizer

    def make(spec_dict: dict[str, Any], index: int = 0, job_dir: Path | None = None) -> StepContext:
        spec = JobSpec.model_validate(spec_dict)
        text = load_text(spec.data, shared_cache)
        tok = load_tokenizer(spec, text, shared_cache)
        corpus = build_corpus(spec, tok, shared_cache, dry_run=False, text=text)
        stream = io.StringIO()
        ctx = StepContext(
            spec=spec, job_dir=job_dir or tmp_path / "job", index=index, emitter=Emitter(stream),
            device=torch.device("cpu"), dry_run=False, corpus=corpus, tokenizer=tok,
            stop=StopFlag(), cache_dir=shared_cache,
        )  # fmt: skip
        ctx.events = lambda: parse_events(stream.getvalue())  # type: ignore[attr-defined]
        return ctx

    return make


def parse_events(text: str) -> list[dict[str, Any]]:
    from optjob.steps.events import parse_event

    return [e for e in map(parse_event, text.splitlines()) if e is not None]


@pytest.fixture
def tiny_model(make_ctx: Callable[..., Any], tiny_spec: Callable[..., dict[str, Any]]) -> Any:
    """``(ctx, model)``: a fresh tiny llama and a context for the first step of the tiny spec."""
    from optjob.steps.modeling import initial_model

    ctx = make_ctx(tiny_spec())
    return ctx, initial_model(ctx.spec, ctx.tokenizer)


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Put SIGTERM/SIGINT handlers back after an in-process ``runner.main``."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
