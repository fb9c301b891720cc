"""Property: any document given to the loader ends in a valid JobSpec or one SpecError.

Hypothesis feeds four families of hostile documents (see spec_fuzz.py); the examples are
real specs the loader must accept, which keeps the mutations near valid input where the
interesting errors are. The count of documents tried is asserted, so a strategy that
quietly stops producing documents fails the test. ``python -m benchmarks.reliability``
runs the same property on many more documents.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from optjob.specs import JobSpec, SpecError, loads_spec
from spec_fuzz import EXAMPLES, STRATEGIES, check

PER_FAMILY = 250
tried: collections.Counter[str] = collections.Counter()


def test_the_examples_are_valid_seeds():
    assert len(EXAMPLES) >= 3
    for text in EXAMPLES:
        assert isinstance(loads_spec(text), JobSpec)


@pytest.mark.parametrize("family", sorted(STRATEGIES))
def test_loader_never_raises_anything_but_spec_error(family: str, record_property: pytest.RecordProperty):
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=PER_FAMILY, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(STRATEGIES[family])
    def prop(text: str) -> None:
        outcomes[check(text)] += 1

    prop()
    total = sum(outcomes.values())
    tried[family] = total
    record_property(f"documents_{family}", total)
    print(f"{family}: {total} documents, {dict(outcomes)}")
    assert total >= PER_FAMILY * 0.9  # the strategy really produced documents
    if family in ("text_mutations", "tree_mutations"):
        assert outcomes["rejected"] > 0  # mutations do break specs...
    if family == "text_mutations":
        assert outcomes["valid"] > 0  # ...and some (a comment, a space) leave them valid


@pytest.mark.parametrize("text, words", [
    ("name: x\nmodel: {init: {layers: " + "9" * 5000 + "}}\nsteps: [{train: {}}]\n", "cannot read this value"),
    ("name: !!timestamp 2020-13-45\n", "cannot read this value"),
    ("name: !!int abc\n", "cannot read this value"),
    ("name: !!float abc\n", "cannot read this value"),
    ("!!bool ", "cannot read this value"),  # KeyError inside PyYAML
    ("!!int ", "cannot read this value"),  # IndexError
    ("name: !!timestamp .x\n", "cannot read this value"),  # AttributeError
    ("name: x\nmodel: {init: {}}\nsteps: [{hpo: {space: {train.lr: {uniform: [0.001, .inf]}}}}, {train: {}}]\n",
     "finite"),
    ("name: x\nmodel: {init: {}}\nsteps: [{train: {betas: [.nan, 0.9]}}]\n", "finite"),
    ("name: x\nmodel: {init: {}}\nsteps: [{train: {}}]\nbudget: {max_usd: 1.0e+999}\n", "finite"),
])
def test_fuzzer_findings_are_spec_errors(text: str, words: str):
    """Found by the fuzzer: Python's ValueError, KeyError, IndexError and AttributeError from YAML's
    scalar constructors escaped the loader, and infinite floats passed validation but came back
    from JSON as null (an unloadable job)."""
    with pytest.raises(SpecError, match=words) as info:
        loads_spec(text, "<fuzz>")
    assert info.value.errors[0].startswith("<fuzz>:")  # with a line and column
