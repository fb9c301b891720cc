"""The tokenizer: a byte-level BPE trained on the data (``builtin``), or a hub/local one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optjob.specs import JobSpec
from optjob.specs.errors import StepError
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
DEFAULT_VOCAB = 4096
_FORMAT = "bpe-v1"  # bump when the builtin recipe changes, so old caches are not reused


def load_tokenizer(spec: JobSpec, text: str, cache_dir: Path) -> PreTrainedTokenizerFast:
    """``builtin``: a byte-level BPE trained on ``text`` to ``model.init.vocab`` tokens
    (cached by hash). A hub model or a saved folder with ``builtin`` uses its own
    tokenizer when it has one. Anything else is a hub id or a local path."""
    name = spec.model.tokenizer
    if name != "builtin":
        return from_pretrained(name)
    model = spec.model
    if model.hf is not None:
        return from_pretrained(model.hf)
    vocab = model.init.vocab if model.init is not None else DEFAULT_VOCAB
    if model.path is not None:
        path = Path(model.path)
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return from_pretrained(str(path))
        vocab = _config_vocab(path) or vocab
    return train_builtin(text, vocab, cache_dir)


def from_pretrained(name: str) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # offline, unknown id, missing files
        where = "local folder" if Path(name).exists() else "hub id (needs network on the node)"
        raise StepError(f"could not load tokenizer {name!r} ({where}): {exc}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise StepError(f"tokenizer {name!r} has no fast (Rust) version; optjob needs one")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def train_builtin(text: str, vocab: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab`` tokens (fewer if the text has too few merges)."""
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(f"{_FORMAT}:{vocab}".encode())
    folder = cache_dir / "tokenizers" / h.hexdigest()[:32]
    if (folder / "tokenizer.json").exists():
        try:
            return _wrap(folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(text), trainer=trainer, length=None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=EOS,
            bos_token=EOS,
            pad_token=EOS,
            unk_token=None,
            clean_up_tokenization_spaces=False,
        )
        wrapped.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _wrap(folder)


def _wrap(folder: Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.clean_up_tokenization_spaces = False
    return tok


def _pieces(text: str, size: int = 65_536) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


def _config_vocab(path: Path) -> int | None:
    try:
        config: Any = json.loads((path / "config.json").read_text())
        return int(config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
