"""``data:`` — the text the steps train and evaluate on."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel

_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Corpora every Python install has; built on the node, no download.
BUILTIN_DATASETS = ("python-docs",)
#: How records become training sequences (``data.format``).
DataFormat = Literal["text", "chat", "prompt-completion"]


class DataSpec(StrictModel):
    source: str = Field("builtin:python-docs", min_length=1, max_length=4096)
    """``builtin:NAME``, ``hf:DATASET[/CONFIG]``, or a local path (a .txt/.jsonl file or a folder)."""
    seq_len: int = Field(128, ge=8, le=131072)
    """Tokens per training sequence."""
    eval_fraction: float = Field(0.05, gt=0.0, le=0.5)
    """Share of the text held out for evaluation (taken from the end)."""
    max_chars: int | None = Field(None, ge=1000, le=10**13)
    """Use at most this many characters of the source (default: all)."""
    text_field: str = Field("text", min_length=1, max_length=128)
    """The field that holds text in .jsonl files and hub datasets."""
    format: DataFormat | None = None
    """text; chat (records with messages: [{role, content}], rendered with the tokenizer's chat
    template); or prompt-completion (records with prompt and completion). Default: detected from
    the first record (text for .txt files and builtin corpora)."""
    eval_source: str | None = Field(None, min_length=1, max_length=4096)
    """A separate evaluation set, given as source is (eval_fraction then does not apply)."""
    loss_on: Literal["completion", "all"] = "completion"
    """chat and prompt-completion: train on the assistant/completion tokens only (prompt tokens
    carry label -100), or on every token."""

    @field_validator("source", "eval_source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\x00" in v:
            raise ValueError("contains a NUL byte")
        if v.startswith("builtin:"):
            name = v.split(":", 1)[1]
            if name not in BUILTIN_DATASETS:
                known = ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS)
                raise ValueError(f"unknown builtin dataset {name!r}; known: {known}")
        elif v.startswith("hf:"):
            name = v[3:]
            # Hub names only: the node passes DATASET to datasets.load_dataset, which would read a
            # path such as ../.. from its disk instead.
            if name.count("/") > 2 or not all(_HUB_PART.match(part) for part in name.split("/")):
                raise ValueError("hf: source must be hf:DATASET or hf:ORG/DATASET[/CONFIG] "
                                 "(letters, digits, '.', '_', '-'; not starting with '.')")
        return v

    @model_validator(mode="after")
    def _format(self) -> DataSpec:
        for name in ("source", "eval_source"):
            value = getattr(self, name)
            if self.format in ("chat", "prompt-completion") and value is not None and (
                value.startswith("builtin:") or value.endswith((".txt", ".md", ".text"))
            ):
                raise ValueError(f"format {self.format} needs records (.jsonl or a hub dataset); "
                                 f"{name} {value!r} is plain text")
        return self

    @property
    def kind(self) -> str:
        """``builtin``, ``hf`` or ``path``."""
        if self.source.startswith("builtin:"):
            return "builtin"
        if self.source.startswith("hf:"):
            return "hf"
        return "path"
