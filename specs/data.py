"""``data:`` — the text the steps train and evaluate on."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from .base import StrictModel

_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Corpora every Python install has; built on the node, no download.
BUILTIN_DATASETS = ("python-docs",)


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

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
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

    @property
    def kind(self) -> str:
        """``builtin``, ``hf`` or ``path``."""
        if self.source.startswith("builtin:"):
            return "builtin"
        if self.source.startswith("hf:"):
            return "hf"
        return "path"
