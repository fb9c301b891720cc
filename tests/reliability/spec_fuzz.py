"""Hypothesis strategies for hostile spec documents, and the property every one must satisfy.

Shared by tests/reliability/test_spec_fuzz.py and ``python -m benchmarks.reliability``.
Four families of documents:

- ``yaml_soup``: token soup from YAML's special characters, tags, anchors, directives,
  control characters and shell metacharacters (mostly not YAML at all);
- ``random_trees``: random nested mappings/lists of hostile scalars, dumped as YAML
  (well-formed YAML, wrong in content);
- ``text_mutations``: the example specs with characters and lines inserted, deleted,
  duplicated, swapped, re-indented or truncated;
- ``tree_mutations``: the example specs parsed, with random fields replaced, removed,
  added or near-missed, dumped back (mostly well-formed specs, wrong in one place).

``check(text)`` is the property: ``loads_spec`` ends in a ``JobSpec`` (which survives the
JSON round trip the manager does through job.json and the state store) or in a ``SpecError``
whose every line names the document, never in any other exception, within ``BOUND_S``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st
from optjob.specs import JobSpec, SpecError, loads_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [p.read_text() for p in sorted((ROOT / "examples").glob("*.yaml"))]
EXAMPLE_TREES = [yaml.safe_load(t) for t in EXAMPLES]
SOURCE = "<fuzz>"
#: Seconds one document may take (a bound against blow-ups; typical is milliseconds).
BOUND_S = 10.0

TOKENS = [
    ": ", "- ", "-", "{", "}", "[", "]", ", ", "&a ", "*a", "&b ", "*b", "!!int ", "!!float ", "!!bool ",
    "!!timestamp ", "!!binary ", "!!str ", "!!null ", "!!map ", "!!seq ", "!!set ", "!!omap ", "!!pairs ",
    "!!python/object/apply:os.system ", "!!python/name:os.system ", "!custom ", "!<tag:x> ", "<<: ", "? ",
    "|", "|-", ">", ">+", "\t", '"', "'", "#", "\n---\n", "\n...\n", "%YAML 1.1\n", "%TAG ! tag:x:\n",
    "\x00", "\x07", "\x1b[31m", "\ufeff", "\x85", "\u2028", "\ud800", "\n", "\n  ", "\n    ", "\r\n", " ",
    "9" * 5000, "0x" + "f" * 40, "0o777", "0b101", "1_000", "1e999", "1.0e+999", ".nan", "-.inf", ".inf", "~",
    "null", "yes", "no", "on", "off", "2020-13-45", "2024-01-01T00:00:00Z", "1:30:00", "$25", "4h", "A100:8",
    "$(rm -rf ~)", "; rm -rf ~", "`id`", "../../", "\\", "é", "𝔘", "name", "model", "init", "steps",
    "train", "hpo", "space", "resources", "budget", "storage", "s3://b/p", "hf:x/y", "builtin:python-docs",
]
FIELDS = sorted({"name", "model", "init", "hf", "path", "tokenizer", "params", "data", "source", "seq_len",
                 "steps", "train", "evaluate", "hpo", "prune", "distill", "quantize", "space", "student",
                 "resources", "cloud", "accelerators", "spot", "region", "nodes", "budget", "max_usd",
                 "max_hours", "teardown", "storage", "artifacts", "max_steps", "lr", "layers", "hidden",
                 "heads", "vocab", "train.lr", "model.init.layers", "log_uniform", "choice", "int", "<<"})

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(TOKENS),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), st.integers(-3, 3), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


def dump(data: Any, flow: bool | None) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True, sort_keys=False)


yaml_soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=8)), max_size=60).map("".join)
random_trees = st.builds(dump, st.dictionaries(keys, values, max_size=8), st.sampled_from([None, True, False]))


@st.composite
def text_mutations(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "dup_line", "swap_lines", "indent", "truncate"]))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:i] + draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5))) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 40)):]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i + draw(st.integers(1, 10)):]
        elif op == "truncate":
            text = text[:i]
        else:
            lines = text.split("\n")
            j, k = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "dup_line":
                lines.insert(k, lines[j])
            elif op == "swap_lines":
                lines[j], lines[k] = lines[k], lines[j]
            else:
                lines[j] = " " * draw(st.integers(0, 6)) + lines[j].lstrip(" ")
            text = "\n".join(lines)
    return text


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*at, i))
    return out


@st.composite
def tree_mutations(draw: st.DrawFn) -> str:
    tree = copy.deepcopy(draw(st.sampled_from(EXAMPLE_TREES)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(tree)[1:]))
        parent = tree
        for seg in path[:-1]:
            parent = parent[seg]
        last = path[-1]
        op = draw(st.sampled_from(["set", "set", "delete", "add", "near_miss", "wrap"]))
        if op == "set":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "wrap":
            parent[last] = [parent[last]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif op == "near_miss" and isinstance(parent, dict) and isinstance(last, str) and last:
            i = draw(st.integers(0, len(last) - 1))
            parent[last[:i] + last[i + 1:] + draw(st.sampled_from("xe_s"))] = parent.pop(last)
    return dump(tree, draw(st.sampled_from([None, True, False])))


STRATEGIES = {"yaml_soup": yaml_soup, "random_trees": random_trees, "text_mutations": text_mutations(),
              "tree_mutations": tree_mutations()}


def check(text: str) -> str:
    """The loader's contract on one document; returns "valid" or "rejected"."""
    started = time.perf_counter()
    try:
        spec = loads_spec(text, SOURCE)
    except SpecError as exc:
        assert exc.errors and all(line.startswith(SOURCE) for line in exc.errors), exc.errors
        outcome = "rejected"
    else:
        assert isinstance(spec, JobSpec)
        # What apply stores (spec_json) must load again (it is re-validated at every launch).
        assert JobSpec.model_validate_json(spec.model_dump_json()) is not None
        outcome = "valid"
    elapsed = time.perf_counter() - started
    assert elapsed < BOUND_S, f"{elapsed:.1f}s for one document"
    return outcome
