"""``model:`` — where the model comes from, and its tokenizer."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel

Activation = Literal["silu", "gelu", "relu"]
#: transformers model types optjob can build from a config. Llama-style models
#: (nn.Linear everywhere) prune and quantize cleanly; gpt2's Conv1D does not.
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class ModelInit(StrictModel):
    """A model built from a config, randomly initialised (no download)."""

    family: Literal["llama", "mistral", "qwen2", "gpt2"] = "llama"
    """transformers model type to build."""
    layers: int = Field(4, ge=1, le=256)
    """Number of transformer blocks."""
    hidden: int = Field(256, ge=8, le=65536)
    """Hidden (embedding) width."""
    heads: int = Field(4, ge=1, le=512)
    """Attention heads; must divide ``hidden``."""
    kv_heads: int | None = Field(None, ge=1, le=512)
    """Key/value heads for grouped-query attention (default: ``heads``)."""
    intermediate: int | None = Field(None, ge=8, le=262144)
    """MLP width (default: about 8/3 x hidden, rounded to 64)."""
    vocab: int = Field(4096, ge=256, le=1_000_000)
    """Vocabulary size; the builtin tokenizer is trained to this size."""
    max_position: int = Field(2048, ge=16, le=1_048_576)
    """Longest sequence the position embedding supports."""
    activation: Activation = "silu"
    """MLP activation."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention (and residuals where the family has it)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""

    @model_validator(mode="after")
    def _shape(self) -> ModelInit:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        return self

    @property
    def mlp_width(self) -> int:
        if self.intermediate is not None:
            return self.intermediate
        return max(64, round(self.hidden * 8 / 3 / 64) * 64)

    def approx_params(self) -> int:
        """Parameter count estimate (embeddings included), used by the planner."""
        kv = self.kv_heads or self.heads
        head_dim = self.hidden // self.heads
        attn = self.hidden * self.hidden * 2 + 2 * self.hidden * kv * head_dim
        mlp = 3 * self.hidden * self.mlp_width if self.family != "gpt2" else 2 * self.hidden * self.mlp_width
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


class ModelSpec(StrictModel):
    """Exactly one of ``init``, ``hf`` or ``path``."""

    init: ModelInit | None = None
    """Build a fresh model from this architecture."""
    hf: str | None = Field(None, pattern=HUB_ID.pattern)
    """A Hugging Face hub id, e.g. ``Qwen/Qwen2.5-0.5B`` (needs network on the node)."""
    path: str | None = Field(None, min_length=1, max_length=4096)
    """A local ``save_pretrained`` directory."""
    tokenizer: str = Field("builtin", min_length=1, max_length=4096)
    """``builtin`` (byte-level BPE trained on the data), a hub id, or a local path."""
    params: int | None = Field(None, ge=1, le=10**14)
    """Parameter count, for planning a hub or path model without downloading it."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("init", "hf", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model.init, model.hf or model.path"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.path is not None and "\x00" in self.path:
            raise ValueError("model.path contains a NUL byte")
        return self
