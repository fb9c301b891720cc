"""Step fingerprints: what reuses a finished step on re-apply."""

from __future__ import annotations

from optjob.specs import loads_spec
from optjob.steps.runner import fingerprints

SPEC = """name: fp
model: {{init: {{layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}}}
steps:
  - train: {{max_steps: 5{train}}}
  - evaluate: {{{evaluate}}}
  - quantize: {{method: fp16}}
"""


def prints(train: str = "", evaluate: str = "") -> list[str]:
    return fingerprints(loads_spec(SPEC.format(train=train, evaluate=evaluate)), False)


def test_the_fingerprints_of_an_unchanged_spec_survive_the_upgrade():
    """The hashes optjob 891e69a wrote (before ``strategy`` and ``tasks`` existed): an upgrade that
    added fields at their defaults must not rerun finished steps."""
    assert prints() == ["1ed8565dfc4a9f4f", "9bbb93ff37a76085", "8cabd0bef96bef6e"]


def test_how_a_step_is_spread_is_not_what_it_computes_but_a_set_field_is():
    assert prints(train=", strategy: fsdp") == prints()  # the plan may pick another on another offer
    assert prints(evaluate="tasks: [hellaswag]")[:1] == prints()[:1]
    assert prints(evaluate="tasks: [hellaswag]")[1:] != prints()[1:]  # the evaluate step and after
    assert prints(train=", lr: 0.01") != prints()
