"""``compare:`` in a spec: what it holds, and the one clear line for each thing it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from optjob.manager.cli import main
from optjob.specs import JobSpec, SpecError, loads_spec

HEAD = """name: cmp
model:
  init: {family: llama, layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}
steps:
  - train: {max_steps: 5}
"""
VARIANTS = """  - compare:
      magnitude: [{prune: {method: magnitude, sparsity: 0.5}}]
      gptq-int4: [{quantize: {method: gptq, bits: 4}}]
      distil_int8: [{distill: {student: {layers: 1}}}, {quantize: {method: int8-weight}}]
"""


def _refused(text: str) -> str:
    with pytest.raises(SpecError) as err:
        loads_spec(text, "spec.yaml")
    return str(err.value)


def test_variants_are_pipelines_from_the_steps_before_compare() -> None:
    spec = loads_spec(HEAD + VARIANTS)
    assert [s.kind for s in spec.pipeline] == ["train"]  # pipeline stops before compare
    assert {n: [s.kind for s in v] for n, v in spec.variants.items()} == {
        "magnitude": ["prune"], "gptq-int4": ["quantize"], "distil_int8": ["distill", "quantize"]}
    own = spec.variant_spec("distil_int8")
    assert [s.kind for s in own.pipeline] == ["train", "distill", "quantize"] and own.compare is None
    # job.json holds the dump: it validates back to the same spec
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert loads_spec(HEAD).variants == {} and loads_spec(HEAD).compare is None


def test_compare_may_be_the_first_step() -> None:
    spec = loads_spec(HEAD.replace("  - train: {max_steps: 5}\n", "") + VARIANTS)
    assert spec.pipeline == [] and len(spec.variants) == 3


def test_a_step_after_compare_is_refused_where_it_stands() -> None:
    line = _refused(HEAD + VARIANTS + "  - evaluate: {}\n")
    assert line.startswith("spec.yaml:10:")
    assert "steps[2].evaluate: no step may follow compare (steps[1])" in line


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + VARIANTS + "  - quantize: {}\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", str(path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:10:" in err[0] and "no step may follow compare" in err[0]


@pytest.mark.parametrize("name", ["Wanda", "1st", "with space", "x" * 33, "_parent"])
def test_bad_variant_names_are_refused(name: str) -> None:
    line = _refused(HEAD + f"  - compare:\n      '{name}': [{{quantize: {{}}}}]\n")
    assert line.startswith("spec.yaml:7:") and "variant name" in line and "lowercase letters" in line


def test_nested_compare_and_hpo_inside_a_variant_are_refused() -> None:
    nested = HEAD + "  - compare:\n      a: [{prune: {}}, {compare: {b: [{quantize: {}}]}}]\n"
    line = _refused(nested)
    assert line.startswith("spec.yaml:7:") and "steps[1].compare.a[1].compare: compare cannot be nested" in line
    hpo = HEAD + "  - compare:\n      a: [{hpo: {space: {train.lr: {uniform: [0.001, 0.01]}}}}, {train: {}}]\n"
    assert "steps[1].compare.a[0].hpo: hpo cannot run inside a compare variant" in _refused(hpo)


def test_empty_compare_and_empty_variants_are_refused() -> None:
    assert "compare needs at least one variant" in _refused(HEAD + "  - compare: {}\n")
    assert "variant a has no steps" in _refused(HEAD + "  - compare: {a: []}\n")


def test_each_variant_chains_with_the_steps_before_compare() -> None:
    quantized = HEAD.replace("train: {max_steps: 5}", "quantize: {method: int8-dynamic}")
    line = _refused(quantized + "  - compare:\n      ok: [{evaluate: {}}]\n      p: [{prune: {}}]\n")
    assert "steps[1].compare.p[0].prune: prune needs gradients, but steps[0] quantized" in line
    line = _refused(HEAD + "  - compare:\n      big: [{distill: {student: {layers: 3}}}]\n")
    assert line.startswith("spec.yaml:7:") and "compare.big[0].distill.student.layers" in line
    # an error inside a variant's step options points at its line
    line = _refused(HEAD + "  - compare:\n      a: [{quantize: {}}]\n      b: [{prune: {sparsity: 2}}]\n")
    assert line.startswith("spec.yaml:8:") and "steps[1].compare.b[0].prune.sparsity" in line
    # a variant's quantize does not stop another variant from training
    loads_spec(HEAD + "  - compare:\n      q: [{quantize: {}}]\n      t: [{train: {max_steps: 2}}]\n")
