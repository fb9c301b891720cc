"""Text sources and the tokenized corpus the steps train and evaluate on.

``load_text`` turns ``data.source`` into one string (cached for the builtin corpus);
``build_corpus`` tokenizes it once (cached by hash) and splits train/eval."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import stat
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optjob.specs import JobSpec
from optjob.specs.data import DataSpec
from optjob.specs.errors import StepError

from .layout import write_bytes_atomic

#: Characters of text a dry run uses at most.
DRY_RUN_CHARS = 200_000
#: Stdlib folders whose docstrings are not prose worth training on.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "turtledemo",
    "lib2to3",
}
_TEXT_SUFFIXES = (".txt", ".md", ".text")
_SEED_MIX = 0x9E3779B97F4A7C15
#: The label of a target that carries no loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


class Corpus:
    """Token ids split into a train and an eval part (eval is the end of the text)."""

    #: Whether some targets carry no loss (``MaskedCorpus``).
    masked = False

    def __init__(self, ids: torch.Tensor, seq_len: int, eval_fraction: float, *, n_eval: int | None = None) -> None:
        ids = ids.to(torch.int64).flatten()
        if n_eval is not None and n_eval < seq_len + 1:  # a separate eval set (data.eval_source)
            raise StepError(f"the eval set has {n_eval:,} tokens: too few for seq_len {seq_len}; "
                            "give a longer data.eval_source or a shorter seq_len")
        n_eval = max(int(len(ids) * eval_fraction) if n_eval is None else n_eval, seq_len + 1)
        if len(ids) - n_eval < seq_len + 1:
            raise StepError(
                f"the data has {len(ids):,} tokens: too few for seq_len {seq_len} and an eval "
                f"split of {eval_fraction}; give more text or a shorter seq_len"
            )
        self.seq_len = seq_len
        self.train_ids = ids[: len(ids) - n_eval]
        self.eval_ids = ids[len(ids) - n_eval :]
        self._window = torch.arange(seq_len + 1)

    @classmethod
    def from_split(cls, train_ids: torch.Tensor, eval_ids: torch.Tensor, seq_len: int) -> Corpus:
        """A corpus whose eval part is given (``data.eval_source``)."""
        both = torch.cat([train_ids.to(torch.int64).flatten(), eval_ids.to(torch.int64).flatten()])
        return cls(both, seq_len, len(eval_ids) / len(both), n_eval=len(eval_ids))

    def __repr__(self) -> str:
        n_train, n_eval = len(self.train_ids), len(self.eval_ids)
        return f"{type(self).__name__}(train={n_train:,} eval={n_eval:,} seq_len={self.seq_len})"

    def train_batch(self, batch_size: int, step: int, seed: int) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` random windows of the train split; a pure
        function of ``(seed, step)``, so a resumed run sees the same batches."""
        g = torch.Generator().manual_seed((seed * _SEED_MIX + step) % (2**63 - 1))
        high = len(self.train_ids) - self.seq_len
        starts = torch.randint(0, high, (batch_size,), generator=g)
        return self.train_ids[starts[:, None] + self._window]

    def eval_windows(self) -> int:
        return (len(self.eval_ids) - 1) // self.seq_len

    def eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive ``[B, seq_len + 1]`` windows of the eval split, overlapping by one
        token so every eval token but the first is predicted exactly once."""
        n = self.eval_windows()
        starts = torch.arange(n) * self.seq_len
        for b, i in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.eval_ids[starts[i : i + batch_size, None] + self._window]


class MaskedCorpus(Corpus):
    """Token ids with a loss mask (chat and prompt-completion records, ``loss_on: completion``).

    ``train_labels`` / ``eval_labels`` are the targets of the same windows ``train_batch`` /
    ``eval_batches`` give, -100 where a target carries no loss (a prompt token). Training windows
    are the rows of the packed records (starting at multiples of ``seq_len``, overlapping by one
    token), so every target is in exactly one; a batch draws rows as a pure function of ``(seed, step)``."""

    masked = True

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, seq_len: int, eval_fraction: float,
                 *, n_eval: int | None = None) -> None:
        super().__init__(ids, seq_len, eval_fraction, n_eval=n_eval)
        mask = mask.to(torch.bool).flatten()
        if len(mask) != len(self.train_ids) + len(self.eval_ids):
            raise ValueError("one mask value per token")
        self.train_mask = mask[: len(self.train_ids)]
        self.eval_mask = mask[len(self.train_ids) :]
        self._rows = (len(self.train_ids) - 1) // seq_len
        if not bool(self.train_mask[1:].any()):
            raise StepError("no training token carries loss (every one is a prompt token); "
                            "check the records or set data.loss_on: all")

    def _starts(self, batch_size: int, step: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * _SEED_MIX + step) % (2**63 - 1))
        return torch.randint(0, self._rows, (batch_size,), generator=g) * self.seq_len

    def train_batch(self, batch_size: int, step: int, seed: int) -> torch.Tensor:
        return self.train_ids[self._starts(batch_size, step, seed)[:, None] + self._window]

    def train_labels(self, batch_size: int, step: int, seed: int) -> torch.Tensor:
        """``[batch_size, seq_len]`` targets of ``train_batch(batch_size, step, seed)``."""
        idx = self._starts(batch_size, step, seed)[:, None] + self._window[1:]
        return torch.where(self.train_mask[idx], self.train_ids[idx], IGNORE_INDEX)

    def eval_labels(self, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """The targets of ``eval_batches(batch_size, max_batches)``, batch by batch."""
        starts = torch.arange(self.eval_windows()) * self.seq_len
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            idx = starts[i : i + batch_size, None] + self._window[1:]
            yield torch.where(self.eval_mask[idx], self.eval_ids[idx], IGNORE_INDEX)


def load_text(data: DataSpec, cache_dir: Path) -> str:
    """The text of ``data.source`` (at most ``data.max_chars`` characters). Chat and
    prompt-completion records give their words with role tags: what the builtin tokenizer learns."""
    from .chat import cap_records, data_format, load_records, record_text

    fmt = data_format(data)
    if fmt != "text":
        records = cap_records(load_records(data.source, data, fmt), data.max_chars)
        return "\n\n".join(record_text(r) for r in records)
    text = source_text(data.source, data, cache_dir)
    if data.max_chars is not None:
        text = text[: data.max_chars]
    if not text.strip():
        raise StepError(f"data source {data.source!r} holds no text")
    return text


def source_text(source: str, data: DataSpec, cache_dir: Path) -> str:
    """The text of one source (``data.source`` or ``data.eval_source``)."""
    if source.startswith("builtin:"):
        return python_docs(cache_dir)
    if source.startswith("hf:"):
        return _hub_text(data.model_copy(update={"source": source}))
    return _path_text(Path(source).expanduser(), data.text_field)


def python_docs(cache_dir: Path) -> str:
    """``builtin:python-docs``: CPython's pydoc topics plus the stdlib's long docstrings.

    Built from this interpreter's own files (no download); cached as a text file."""
    version = "{}.{}".format(*sys.version_info[:2])
    path = cache_dir / "corpus" / f"python-docs-{version}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    import pydoc_data.topics as topics

    parts = [topics.topics[k].strip() for k in sorted(topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(file.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
    text = "\n\n".join(parts)
    write_bytes_atomic(path, text.encode("utf-8"))
    return text


def _hub_text(data: DataSpec) -> str:
    name = data.source[3:]
    try:
        import datasets
    except ImportError:
        raise StepError(
            f"data source {data.source!r}: hub datasets need network and the `datasets` package "
            "(pip install datasets); or give a local .txt/.jsonl file or folder"
        ) from None
    parts = name.split("/")  # DATASET, ORG/DATASET or ORG/DATASET/CONFIG
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        ds = datasets.load_dataset(repo, config, split="train")
    except Exception as exc:  # offline, unknown dataset, gated...
        raise StepError(
            f"could not load hub dataset {name!r}: {exc} (hub datasets need network on the node)"
        ) from None
    if data.text_field not in ds.column_names:
        raise StepError(
            f"hub dataset {name!r} has no field {data.text_field!r} (it has {ds.column_names})"
        )
    out: list[str] = []
    total = 0
    for row in ds:
        out.append(str(row[data.text_field]))
        total += len(out[-1]) + 2
        if data.max_chars is not None and total >= data.max_chars:
            break
    return "\n\n".join(out)


def _path_text(path: Path, field: str) -> str:
    if not path.exists():
        raise StepError(f"data source {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in (*_TEXT_SUFFIXES, ".jsonl")
        )
        if not files:
            raise StepError(f"data folder {str(path)!r} has no .txt, .md or .jsonl files")
        return "\n\n".join(_file_text(p, field) for p in files)
    return _file_text(path, field)


def _file_text(path: Path, field: str) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise StepError(f"cannot read data file {str(path)!r}: {exc}") from None
    if not stat.S_ISREG(mode):  # a FIFO blocks the read forever, /dev/zero never ends
        raise StepError(f"data source {str(path)!r} is not a regular file (a pipe or a device?); "
                        "give a .txt/.jsonl file or a folder")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StepError(f"cannot read data file {str(path)!r}: {exc}") from None
    if path.suffix != ".jsonl":
        return raw
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except ValueError as exc:
            raise StepError(f"{path}:{n}: not valid JSON: {exc}") from None
        if not isinstance(row, dict) or field not in row:
            raise StepError(f"{path}:{n}: no field {field!r} (set data.text_field)")
        out.append(str(row[field]))
    return "\n\n".join(out)


def build_corpus(
    spec: JobSpec, tokenizer: Any, cache_dir: Path, *, dry_run: bool, text: str | None = None
) -> Corpus:
    """Tokenize the data once (ids cached in ``cache_dir/tokens`` by hash) and split it: the end
    of the text is the eval part, or ``data.eval_source`` is. Chat / prompt-completion records
    become a ``MaskedCorpus`` (a plain one under ``loss_on: all``)."""
    from .chat import data_format

    data = spec.data
    fmt = data_format(data)
    if fmt != "text":
        return _record_corpus(data, fmt, tokenizer, cache_dir, dry_run)
    if text is None:
        text = load_text(data, cache_dir)
    if dry_run:
        text = text[:DRY_RUN_CHARS]
    ids = encode_cached(text, tokenizer, cache_dir)
    if data.eval_source is None:
        return Corpus(ids, data.seq_len, data.eval_fraction)
    eval_text = source_text(data.eval_source, data, cache_dir)
    eval_text = eval_text[:DRY_RUN_CHARS] if dry_run else eval_text
    if not eval_text.strip():
        raise StepError(f"data.eval_source {data.eval_source!r} holds no text")
    return Corpus.from_split(ids, encode_cached(eval_text, tokenizer, cache_dir), data.seq_len)


def _record_corpus(data: DataSpec, fmt: str, tokenizer: Any, cache_dir: Path, dry_run: bool) -> Corpus:
    from .chat import cap_records, ensure_chat_template, load_records

    if fmt == "chat":
        ensure_chat_template(tokenizer)  # saved with every output model's tokenizer
    caps = [c for c in (data.max_chars, DRY_RUN_CHARS if dry_run else None) if c is not None]
    records = cap_records(load_records(data.source, data, fmt), min(caps) if caps else None)
    ids, mask = encode_records(records, fmt, tokenizer, cache_dir)
    n_eval = None
    if data.eval_source is not None:
        held = load_records(data.eval_source, data, fmt)
        eval_ids, eval_mask = encode_records(cap_records(held, DRY_RUN_CHARS if dry_run else None), fmt,
                                             tokenizer, cache_dir)
        ids, mask, n_eval = torch.cat([ids, eval_ids]), torch.cat([mask, eval_mask]), len(eval_ids)
    if data.loss_on == "all":
        return Corpus(ids, data.seq_len, data.eval_fraction, n_eval=n_eval)
    return MaskedCorpus(ids, mask, data.seq_len, data.eval_fraction, n_eval=n_eval)


def encode_records(
    records: list[dict[str, Any]], fmt: str, tokenizer: Any, cache_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, carries loss) of ``records`` packed one after the other; cached by hash."""
    from .chat import encode_record

    h = hashlib.sha256(json.dumps(records, sort_keys=True).encode("utf-8"))
    h.update(f"{fmt}:{getattr(tokenizer, 'chat_template', None)}:{_tokenizer_identity(tokenizer)}".encode())
    path = cache_dir / "tokens" / f"{h.hexdigest()[:32]}.records.npz"
    if path.exists():
        try:
            with np.load(path) as saved:
                return torch.from_numpy(saved["ids"].astype(np.int64)), torch.from_numpy(saved["mask"].astype(bool))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
    ids: list[int] = []
    mask: list[bool] = []
    for record in records:
        part, loss = encode_record(tokenizer, record, fmt)
        ids.extend(part)
        mask.extend(loss)
    arr, flags = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=arr, mask=flags)
    os.replace(tmp, path)
    return torch.from_numpy(arr), torch.from_numpy(flags)


def encode_cached(text: str, tokenizer: Any, cache_dir: Path) -> torch.Tensor:
    """Token ids of ``text``: encoded in paragraph chunks (in parallel), cached as .npy."""
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(_tokenizer_identity(tokenizer).encode("utf-8"))
    path = cache_dir / "tokens" / f"{h.hexdigest()[:32]}.npy"
    if path.exists():
        try:
            return torch.from_numpy(np.load(path).astype(np.int64))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    chunks = list(_chunks(text))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(chunks, add_special_tokens=False)
        seqs = [e.ids for e in encodings]
    else:
        seqs = [tokenizer.encode(c, add_special_tokens=False) for c in chunks]
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    ids = np.fromiter((i for s in seqs for i in s), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, path)
    return torch.from_numpy(ids.astype(np.int64))


def _chunks(text: str, size: int = 16_384) -> Iterator[str]:
    """Pieces of about ``size`` characters cut just before a blank line when there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n\n", start + 1, end)
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"

