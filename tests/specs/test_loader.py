"""The loader: every malformed spec ends as one SpecError naming file:line:col and the field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optjob.specs import JobSpec, SpecError, load_spec, loads_spec

GOOD = """\
name: tiny
model:
  init: {family: llama, layers: 2, hidden: 64, heads: 4, vocab: 512}
steps:
  - train: {max_steps: 20, lr: 1.0e-3}
  - evaluate:
"""

# (document, line, column or None, field path, words the message must contain)
MALFORMED = [
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - train: {lr: -1}\n", 4, 17, "steps[0].train.lr", "greater than 0"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - train: {lrr: 0.1}\n", 4, 13, "steps[0].train.lrr",
     "did you mean 'lr'"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - trian: {}\n", 4, 5, "steps[0]", "did you mean 'train'"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - {train: {}, evaluate: {}}\n", 4, 5, "steps[0]", "exactly one key"),
    ("name: Tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n", 1, 7, "name", "lowercase"),
    ("name: tiny\nsteps: [{train: {}}]\n", 1, 1, "model", "required"),
    ("name: tiny\nmodel: {init: {}, hf: gpt2}\nsteps: [{train: {}}]\n", 2, 8, "model", "exactly one of"),
    ("name: tiny\nmodel: {init: {hidden: 100, heads: 3}}\nsteps: [{train: {}}]\n", 2, 15, "model.init", "divisible"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\ndata: {source: 'builtin:nope'}\n", 4, 16, "data.source",
     "unknown builtin dataset"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nresources: {accelerators: 'A100:x'}\n", 4, 27,
     "resources.accelerators", "NAME:COUNT"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nbudget: {max_usd: 'lots'}\n", 4, 19, "budget.max_usd",
     "dollar"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nresources: {cloud: mars}\n", 4, 20, "resources.cloud",
     "'local'"),
    ("name: tiny\nmodel: {init: {layers: 4}}\nsteps:\n  - train: {}\n  - distill: {student: {layers: 8}}\n", 5, 33,
     "steps[1].distill.student.layers", "larger than the teacher"),
    ("name: tiny\nmodel: {init: {heads: 4}}\nsteps:\n  - prune: {method: structured, heads_fraction: 0.9}\n", 4, 49,
     "steps[0].prune.heads_fraction", "every attention head"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - quantize: {method: int8-dynamic}\n  - train: {}\n", 5, 12,
     "steps[1].train", "quantized"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - hpo: {space: {train.nope: {int: [1, 2]}}}\n  - train: {}\n", 4, 31,
     "steps[0].hpo.space['train.nope']", "no searchable field"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - hpo: {space: {train.lr: {uniform: [0.1, 0.2]}}}\n", 4, 10,
     "steps[0].hpo", "none"),
    ("name: tiny\nmodel: {init: {}}\nsteps:\n  - train: {warmup_steps: 50, max_steps: 10}\n", 4, 12,
     "steps[0].train", "warmup_steps"),
    ("name: tiny\nmodel: {init: {}}\nsteps: []\n", 3, 8, "steps", "at least 1"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nresources: {cloud: aws, spot: true}\n", 1, 1,
     "storage.artifacts", "s3://"),
    # A key that looks like pydantic's validator-wrapper location segment (found by the fuzzer: it crashed)
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\nfunction-: 1\n", 4, 1, "['function-']",
     "unknown field 'function-'"),
    ("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n'function-after[x]': 1\n", 4, 1,
     "['function-after[x]']", "unknown field"),
]


@pytest.mark.parametrize("doc,line,col,path,words", MALFORMED, ids=[m[3] for m in MALFORMED])
def test_malformed_spec_names_line_and_field(tmp_path: Path, doc: str, line: int, col: int, path: str, words: str):
    f = tmp_path / "spec.yaml"
    f.write_text(doc)
    with pytest.raises(SpecError) as info:
        load_spec(f)
    first = info.value.errors[0]
    assert first.startswith(f"{f}:{line}:{col}: {path}: "), first
    assert words in first, first


@pytest.mark.parametrize(
    "doc,words",
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("name: a\nname: b\n", "duplicate key 'name'"),
        ("name: [unclosed\n", "YAML syntax error"),
        ("just a string", "mapping"),
        ("a: 1\n---\nb: 2\n", "one document"),
        ("\x00\x01binary", "NUL"),
    ],
)
def test_broken_documents(doc: str, words: str):
    with pytest.raises(SpecError) as info:
        loads_spec(doc)
    assert words in str(info.value)


def test_wrong_encoding_is_one_clear_error(tmp_path: Path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(f)


def test_yaml_bomb_and_deep_nesting_fail_fast(tmp_path: Path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]\n"
    deep = "[" * 10_000 + "]" * 10_000
    for doc, words in ((bomb, "aliases expand"), (deep, "nested deeper")):
        start = time.perf_counter()
        with pytest.raises(SpecError, match=words):
            loads_spec(doc)
        assert time.perf_counter() - start < 5  # a bound against blow-up, not a timing assertion


def test_huge_file_is_refused_before_reading(tmp_path: Path):
    f = tmp_path / "big.yaml"
    with open(f, "wb") as out:
        out.truncate(50 * 1024 * 1024)
    with pytest.raises(SpecError, match="at most"):
        load_spec(f)


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="directory"):
        load_spec(tmp_path)


def test_shorthands_parse_in_one_place():
    spec = loads_spec(GOOD + "resources: {accelerators: [A100:8, {H100: 4}], memory: 512MB, hourly_usd: '$2.5'}\n"
                      "budget: {max_usd: '$25', max_hours: 30m}\n")
    assert spec.resources.accelerator_choices == [("A100", 8), ("H100", 4)]
    assert spec.resources.memory == pytest.approx(0.5)
    assert spec.resources.hourly_usd == 2.5
    assert spec.budget.max_usd == 25.0
    assert spec.budget.max_hours == pytest.approx(0.5)


def test_pipeline_and_null_step_defaults():
    spec = loads_spec(GOOD)
    kinds = [s.kind for s in spec.pipeline]
    assert kinds == ["train", "evaluate"]
    assert spec.pipeline[1].metrics == ["perplexity", "accuracy", "latency", "size"]


def test_dump_round_trips():
    spec = loads_spec(GOOD)
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


def test_dates_stay_strings():
    spec = loads_spec(GOOD.replace("name: tiny", "name: tiny") + "resources: {cloud: aws, region: 2024-01-01}\n"
                      .replace("2024-01-01", "us-east-1"))
    assert spec.resources.region == "us-east-1"
