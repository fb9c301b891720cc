"""Tiny random models of each model family, saved as their checkpoints would be: the family
matrix that tests/steps/test_families.py runs every step on, and benchmarks/families.py tabulates.

2 layers, hidden 32 (4 heads; 2 key/value heads where the family has grouped-query attention),
MLP 64, vocab 256: gpt2, llama (untied and tied), mistral, qwen2, qwen3, phi3, phi, gpt_neox,
opt, gemma, gemma2, and a bf16 llama and a tied fp16 qwen3 checkpoint. Built from configs
(``AutoConfig.for_model``), so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from optjob.steps.data import Corpus
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 256
LLAMA_FIELDS: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
_LLAMA = LLAMA_FIELDS
#: name -> (model_type, config fields, checkpoint dtype)
# fmt: off
FAMILIES: dict[str, tuple[str, dict[str, Any], torch.dtype]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                          bos_token_id=0, eos_token_id=0), torch.float32),
    "llama": ("llama", dict(_LLAMA, num_key_value_heads=2), torch.float32),
    "llama-tied": ("llama", dict(_LLAMA, tie_word_embeddings=True), torch.float32),
    "mistral": ("mistral", dict(_LLAMA, num_key_value_heads=2, sliding_window=None), torch.float32),
    "qwen2": ("qwen2", dict(_LLAMA, num_key_value_heads=2), torch.float32),
    "qwen3": ("qwen3", dict(_LLAMA, num_key_value_heads=2, head_dim=8), torch.float32),
    "phi3": ("phi3", dict(_LLAMA, num_key_value_heads=2, pad_token_id=0, eos_token_id=0,
                          bos_token_id=0), torch.float32),
    "phi": ("phi", dict(_LLAMA), torch.float32),
    "gpt_neox": ("gpt_neox", dict(_LLAMA), torch.float32),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=64), torch.float32),
    "gemma": ("gemma", dict(_LLAMA, num_key_value_heads=1, head_dim=8), torch.float32),
    "gemma2": ("gemma2", dict(_LLAMA, num_key_value_heads=2, head_dim=8), torch.float32),
    "llama-bf16": ("llama", dict(_LLAMA, num_key_value_heads=2), torch.bfloat16),
    "qwen3-fp16": ("qwen3", dict(_LLAMA, num_key_value_heads=2, head_dim=8,
                                 tie_word_embeddings=True), torch.float16),
}
# fmt: on
NAMES = list(FAMILIES)
#: Families whose attention takes the head width from hidden / heads (no head pruning).
NO_HEADS = {"gpt2", "gpt_neox", "opt"}


def family_config(name: str, vocab: int = VOCAB) -> Any:
    kind, fields, _ = FAMILIES[name]
    return AutoConfig.for_model(kind, vocab_size=vocab, **fields)


def build_checkpoint(name: str, folder: Path, *, seed: int = 0) -> Path:
    """``name``'s tiny random model, saved in its dtype to ``folder``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name), dtype=FAMILIES[name][2])
    model.save_pretrained(folder)
    return folder


def build_checkpoints(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every family's (or ``names``') checkpoint, one folder each under ``root``."""
    return {name: build_checkpoint(name, root / name) for name in names or NAMES}


def random_corpus(tokens: int = 3000, seq_len: int = 16, seed: int = 0) -> Corpus:
    """Random token ids over :data:`VOCAB`, a fifth held out for evaluation."""
    g = torch.Generator().manual_seed(seed)
    return Corpus(torch.randint(0, VOCAB, (tokens,), generator=g), seq_len=seq_len, eval_fraction=0.2)


def step_context(job_dir: Path, step: dict[str, Any], corpus: Corpus) -> Any:
    """A ``StepContext`` on the CPU for one step (``{kind: options}``) over ``corpus``, events to nowhere."""
    import io

    from optjob.specs import JobSpec
    from optjob.steps.context import StepContext, StopFlag
    from optjob.steps.events import Emitter

    init = {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "vocab": VOCAB}
    spec = JobSpec.model_validate({"name": "t", "model": {"init": init}, "steps": [step]})
    return StepContext(spec=spec, job_dir=job_dir, index=0, emitter=Emitter(io.StringIO()), device=torch.device("cpu"),
                       dry_run=False, corpus=corpus, tokenizer=None, stop=StopFlag())  # fmt: skip
