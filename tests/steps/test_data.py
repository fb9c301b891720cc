"""Text sources, the tokenizer, and the tokenized corpus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from optjob.specs import JobSpec
from optjob.specs.data import DataSpec
from optjob.specs.errors import StepError
from optjob.steps.data import Corpus, build_corpus, encode_cached, load_text
from optjob.steps.tokenizer import load_tokenizer, train_builtin


def test_builtin_corpus_is_large_and_cached(shared_cache: Path) -> None:
    text = load_text(DataSpec(), shared_cache)
    assert len(text) > 1_000_000
    assert "for" in text and "def" in text
    cached = list((shared_cache / "corpus").glob("python-docs-*.txt"))
    assert len(cached) == 1
    t = time.perf_counter()
    again = load_text(DataSpec(), shared_cache)
    assert again == text
    assert time.perf_counter() - t < 1.0


def test_max_chars(shared_cache: Path) -> None:
    assert len(load_text(DataSpec(max_chars=5000), shared_cache)) == 5000


def test_local_txt_jsonl_and_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha text")
    rows = [{"body": "beta"}, {"body": "gamma"}]
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    txt = DataSpec(source=str(tmp_path / "d" / "a.txt"))
    assert load_text(txt, tmp_path) == "alpha text"
    jsonl = DataSpec(source=str(tmp_path / "d" / "b.jsonl"), text_field="body")
    assert load_text(jsonl, tmp_path) == "beta\n\ngamma"
    folder = DataSpec(source=str(tmp_path / "d"), text_field="body")
    assert load_text(folder, tmp_path) == "alpha text\n\nbeta\n\ngamma"


def test_bad_local_sources(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="does not exist"):
        load_text(DataSpec(source=str(tmp_path / "missing.txt")), tmp_path)
    (tmp_path / "x.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(StepError, match="no field 'text'"):
        load_text(DataSpec(source=str(tmp_path / "x.jsonl")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match=r"no \.txt"):
        load_text(DataSpec(source=str(tmp_path / "empty")), tmp_path)


def test_hub_dataset_offline_is_a_step_error(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="network"):
        load_text(DataSpec(source="hf:someone/some-dataset"), tmp_path)


def test_builtin_tokenizer_round_trips_and_is_cached(shared_cache: Path) -> None:
    text = load_text(DataSpec(max_chars=200_000), shared_cache)
    tok = train_builtin(text, 512, shared_cache)
    assert len(tok) == 512
    sample = text[1000:4000] + "\n  unusual: ünïcødé ✓ \t tabs\n"
    ids = tok.encode(sample, add_special_tokens=False)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample) / 1.5  # it learned merges
    folders = list((shared_cache / "tokenizers").iterdir())
    t = time.perf_counter()
    again = train_builtin(text, 512, shared_cache)
    assert time.perf_counter() - t < 1.0
    assert list((shared_cache / "tokenizers").iterdir()) == folders
    assert again.encode(sample, add_special_tokens=False) == ids
    assert tok.eos_token is not None and tok.pad_token_id is not None


def test_hub_tokenizer_offline_is_a_step_error(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {"name": "t", "model": {"init": {}, "tokenizer": "nobody/no-such-tokenizer"},
         "steps": [{"evaluate": None}]}
    )  # fmt: skip
    with pytest.raises(StepError, match="could not load tokenizer"):
        load_tokenizer(spec, "text", tmp_path)


def _corpus(shared_cache: Path, seq_len: int = 32) -> Corpus:
    spec = JobSpec.model_validate(
        {"name": "t", "model": {"init": {"vocab": 512}}, "steps": [{"evaluate": None}],
         "data": {"seq_len": seq_len, "max_chars": 200_000, "eval_fraction": 0.05}}
    )  # fmt: skip
    text = load_text(spec.data, shared_cache)
    return build_corpus(spec, load_tokenizer(spec, text, shared_cache), shared_cache,
                        dry_run=False, text=text)  # fmt: skip


def test_token_ids_are_cached(shared_cache: Path) -> None:
    text = load_text(DataSpec(max_chars=50_000), shared_cache)
    tok = train_builtin(text, 512, shared_cache)
    first = encode_cached(text, tok, shared_cache)
    assert first.dtype == torch.int64
    assert torch.equal(encode_cached(text, tok, shared_cache), first)
    whole = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert first.tolist() == whole  # chunked encoding equals one pass


def test_train_batch_is_a_pure_function_of_seed_and_step(shared_cache: Path) -> None:
    corpus = _corpus(shared_cache)
    a = corpus.train_batch(8, 3, seed=0)
    assert a.shape == (8, 33) and a.dtype == torch.int64
    assert torch.equal(a, corpus.train_batch(8, 3, seed=0))
    assert not torch.equal(a, corpus.train_batch(8, 4, seed=0))
    assert not torch.equal(a, corpus.train_batch(8, 3, seed=1))
    corpus.train_batch(8, 99, seed=5)  # no hidden state: order does not matter
    assert torch.equal(a, corpus.train_batch(8, 3, seed=0))


def test_eval_split_is_the_end_and_disjoint(shared_cache: Path) -> None:
    corpus = _corpus(shared_cache)
    n_train, n_eval = len(corpus.train_ids), len(corpus.eval_ids)
    assert 0.04 < n_eval / (n_train + n_eval) < 0.06
    batches = list(corpus.eval_batches(8))
    assert all(b.shape[1] == 33 for b in batches) and batches[0].shape[0] == 8
    assert sum(b.shape[0] for b in batches) == corpus.eval_windows()
    assert torch.equal(batches[0][0], corpus.eval_ids[:33])
    assert torch.equal(batches[0][1][0], batches[0][0][-1])  # windows overlap by one token
    assert len(list(corpus.eval_batches(8, max_batches=2))) == 2
    assert torch.equal(next(corpus.eval_batches(8)), batches[0])


def test_train_and_eval_windows_never_overlap() -> None:
    ids = torch.arange(10_000)  # each token is its own position
    corpus = Corpus(ids, seq_len=32, eval_fraction=0.1)
    n_train = len(corpus.train_ids)
    assert n_train == 9_000 and torch.equal(corpus.eval_ids, ids[9_000:])
    train_max = max(int(corpus.train_batch(64, step, seed=0).max()) for step in range(100))
    assert n_train - 40 < train_max < n_train  # reaches the end of train, never past it
    eval_min = min(int(b.min()) for b in corpus.eval_batches(8))
    assert eval_min == n_train


def test_too_little_data(shared_cache: Path) -> None:
    with pytest.raises(StepError, match="too few"):
        Corpus(torch.arange(50), seq_len=32, eval_fraction=0.05)


def test_dry_run_slices_the_text(shared_cache: Path) -> None:
    spec = JobSpec.model_validate(
        {"name": "t", "model": {"init": {"vocab": 512}}, "steps": [{"evaluate": None}],
         "data": {"seq_len": 32}}
    )  # fmt: skip
    text = load_text(spec.data, shared_cache)
    tok = train_builtin(text[:200_000], 512, shared_cache)
    corpus = build_corpus(spec, tok, shared_cache, dry_run=True, text=text)
    assert len(corpus.train_ids) + len(corpus.eval_ids) < 200_000
