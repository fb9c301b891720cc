"""Issue 13, item 10: numbers the workload hands to torch, numpy, optuna or ``random`` are bounded
by the spec, so an out-of-range one fails ``validate`` (one FILE:LINE:COL line) instead of the
node after money is spent ("Overflow when unpacking long long")."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from optjob.specs import SpecError, load_spec, loads_spec

SEED_MAX = 2**32 - 1  # numpy's RandomState (optuna's samplers) takes seeds below 2**32

HEAD = "name: tiny\nmodel:\n  init: {layers: 2, hidden: 64, heads: 2, vocab: 512}\n"
HUGE = "99999999999999999999999"


def refused(doc: str, where: str, words: str) -> str:
    """``doc`` fails with exactly one line ``<spec>:LINE:COL: where: ...words...``."""
    with pytest.raises(SpecError) as info:
        loads_spec(doc, "<spec>")
    lines = info.value.errors
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("<spec>:") and f": {where}: " in line and words in line, line
    assert "\n" not in line and str(info.value) == line
    return line


@pytest.mark.parametrize("step, field", [
    ("train", "seed"), ("distill", "seed"), ("prune", "seed"), ("hpo", "seed"),
])
@pytest.mark.parametrize("value", [HUGE, str(SEED_MAX + 1), "-1"])
def test_every_seed_is_bounded(step: str, field: str, value: str):
    after = "  - train: {}\n" if step == "hpo" else ""
    body = f"{{{field}: {value}, space: {{train.lr: {{uniform: [0.001, 0.01]}}}}}}" if step == "hpo" \
        else f"{{{field}: {value}}}"
    doc = HEAD + f"steps:\n  - {step}: {body}\n" + after
    line = refused(doc, f"steps[0].{step}.{field}", "4294967295" if value != "-1" else "greater than or equal to 0")
    assert line.startswith("<spec>:5:")  # the step's line, not the document's top


def test_the_largest_seed_is_valid_everywhere_it_goes():
    spec = loads_spec(HEAD + f"steps:\n  - train: {{seed: {SEED_MAX}}}\n")
    seed = spec.pipeline[0].seed  # type: ignore[attr-defined]
    np.random.RandomState(seed)  # the strictest consumer (optuna's samplers)
    torch.manual_seed(seed)
    random.Random(seed)


def test_the_issue_spec_fails_validate_with_its_line(tmp_path: Path):
    spec = tmp_path / "s.yaml"
    spec.write_text(HEAD + "steps:\n  - train:\n      max_steps: 10\n      seed: " + HUGE + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.errors == [f"{spec}:7:13: steps[0].train.seed: Input should be less than or equal to 4294967295"]


BOUNDED = [
    (HEAD + "steps: [{train: {max_steps: 10000001}}]\n", "steps[0].train.max_steps", "less than or equal"),
    (HEAD + "steps: [{train: {warmup_steps: " + HUGE + "}}]\n", "steps[0].train.warmup_steps", "less than or equal"),
    (HEAD + "steps: [{train: {batch_size: 65537}}]\n", "steps[0].train.batch_size", "less than or equal"),
    (HEAD + "steps: [{train: {eval_every: " + HUGE + "}}]\n", "steps[0].train.eval_every", "less than or equal"),
    (HEAD + "steps: [{train: {checkpoint_every: " + HUGE + "}}]\n", "steps[0].train.checkpoint_every", "less than"),
    (HEAD + "steps: [{evaluate: {batch_size: " + HUGE + "}}]\n", "steps[0].evaluate.batch_size", "less than"),
    (HEAD + "steps: [{prune: {recover_steps: " + HUGE + "}}]\n", "steps[0].prune.recover_steps", "less than"),
    (HEAD + "steps: [{quantize: {group_size: " + HUGE + "}}]\n", "steps[0].quantize.group_size", "less than"),
    (HEAD + "steps: [{distill: {student: {layers: " + HUGE + "}}}]\n", "steps[0].distill.student.layers", "less than"),
    (HEAD + "steps: [{distill: {student: {hidden: 65537}}}]\n", "steps[0].distill.student.hidden", "less than"),
    (HEAD + "steps: [{train: {early_stopping: {patience: " + HUGE + "}, eval_every: 5}}]\n",
     "steps[0].train.early_stopping.patience", "less than"),
    ("name: tiny\nmodel: {init: {hidden: 65537, heads: 1}}\nsteps: [{train: {}}]\n", "model.init.hidden", "less than"),
    ("name: tiny\nmodel: {init: {vocab: " + HUGE + "}}\nsteps: [{train: {}}]\n", "model.init.vocab", "less than"),
    ("name: tiny\nmodel: {hf: gpt2, params: " + HUGE + "}\nsteps: [{train: {}}]\n", "model.params", "less than"),
    ("name: tiny\nmodel: {init: {}}\ndata: {seq_len: " + HUGE + "}\nsteps: [{train: {}}]\n", "data.seq_len",
     "less than"),
    ("name: tiny\nmodel: {init: {}}\ndata: {max_chars: " + HUGE + "}\nsteps: [{train: {}}]\n", "data.max_chars",
     "less than"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nresources: {cpus: " + HUGE + "}\n", "resources.cpus",
     "less than"),
]


@pytest.mark.parametrize("doc, where, words", BOUNDED, ids=[where for _, where, _ in BOUNDED])
def test_counts_and_sizes_are_bounded(doc: str, where: str, words: str):
    refused(doc, where, words)


def test_real_llm_sizes_still_validate():
    doc = ("name: big\nmodel:\n  init: {layers: 126, hidden: 16384, heads: 128, kv_heads: 8, intermediate: 53248,"
           " vocab: 256000, max_position: 131072}\ndata: {seq_len: 8192}\n"
           "steps:\n  - train: {max_steps: 1000000, batch_size: 2048, grad_accum: 64, seed: 1234567890}\n")
    assert loads_spec(doc).model.init.hidden == 16384  # type: ignore[union-attr]


HPO = HEAD + "steps:\n  - hpo:\n      space:\n        KEY: DIST\n  - train: {}\n"


def hpo_doc(key: str, dist: str) -> str:
    return HPO.replace("KEY", key).replace("DIST", dist)


@pytest.mark.parametrize("key, dist, where, words", [
    ("train.seed", "{int: [0, " + HUGE + "]}", "steps[0].hpo.space['train.seed'].int[1]", "less than or equal"),
    ("train.batch_size", "{int: [1, 10000000]}", "steps[0].hpo.space['train.batch_size'].int[1]",
     "10000000 is not a valid batch_size"),
    ("train.max_steps", "{choice: [100, 0]}", "steps[0].hpo.space['train.max_steps'].choice[1]",
     "0 is not a valid max_steps"),
    ("train.batch_size", "{uniform: [1, 8]}", "steps[0].hpo.space['train.batch_size'].uniform", "is an integer"),
    ("train.precision", "{choice: [fp32, fp64]}", "steps[0].hpo.space['train.precision'].choice[1]",
     "'fp64' is not a valid precision"),
    ("model.init.layers", "{int: [1, 1000]}", "steps[0].hpo.space['model.init.layers'].int[1]",
     "1000 is not a valid layers"),
])
def test_a_search_space_outside_its_field_fails_validate(key: str, dist: str, where: str, words: str):
    line = refused(hpo_doc(key, dist), where, words)
    assert line.startswith("<spec>:7:")  # on the dimension's line


@pytest.mark.parametrize("key, dist", [
    ("train.lr", "{log_uniform: [1.0e-4, 1.0e-2]}"),
    ("train.batch_size", "{int: [2, 16]}"),
    ("train.seed", "{int: [0, 4294967295]}"),
    ("train.eval_every", "{choice: [null, 5]}"),
    ("train.precision", "{choice: [fp32, bf16]}"),
    ("model.init.dropout", "{uniform: [0.0, 0.3]}"),
    ("model.init.activation", "{choice: [silu, gelu]}"),
])
def test_search_spaces_inside_their_fields_validate(key: str, dist: str):
    loads_spec(hpo_doc(key, dist))
