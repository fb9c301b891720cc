"""What goes over and under a spec: ``--set PATH=VALUE``, ``--name``, and the user config
(``$OPTJOB_HOME/config.yaml``) merged under it, each problem reported where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from optjob.specs import SpecError
from optjob.specs.layers import Layers
from optjob.specs.loader import load_layered, load_spec, loads_spec

SPEC = """\
name: quick
model: {init: {layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
steps:
  - hpo: {trials: 2, trial_steps: 2, space: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}
  - train: {max_steps: 300, lr: 3.0e-3}
budget: {max_hours: 1}
"""
CONFIG = """\
resources: {cloud: aws, region: us-east-1}
storage: {artifacts: s3://my-bucket/optjob}
budget: {max_usd: 20}
teardown: on_success
"""


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(SPEC)
    return p


def _errors(path: Path, layers: Layers) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_spec(path, layers)
    return exc.value.errors


def test_set_overrides_fields_by_path_with_yaml_values(spec_file: Path) -> None:
    loaded = load_layered(spec_file, Layers(sets=("budget.max_usd=5", "steps.1.train.max_steps=100",
                                                  "steps[1].train.lr=1e-3", "teardown=never"), name="other"))
    spec = loaded.spec
    assert spec.name == "other" and spec.budget.max_usd == 5.0 and spec.budget.max_hours == 1.0
    assert spec.pipeline[1].max_steps == 100 and spec.pipeline[1].lr == 1e-3  # type: ignore[attr-defined]
    assert spec.teardown == "never"
    assert loaded.describe() == ["set on the command line: budget.max_usd=5, steps.1.train.max_steps=100, "
                                 "steps[1].train.lr=1e-3, teardown=never, name=other"]
    # The file itself is untouched, and a later --set of the same path wins.
    assert load_spec(spec_file).name == "quick"
    assert load_spec(spec_file, Layers(sets=("budget.max_usd=5", "budget.max_usd=7"))).budget.max_usd == 7.0


def test_set_reaches_keys_with_dots_and_creates_missing_mappings(spec_file: Path) -> None:
    spec = load_spec(spec_file, Layers(sets=(
        "steps.0.hpo.space.train.lr.log_uniform=[1.0e-5, 1.0e-3]",  # the existing key 'train.lr'
        "steps.0.hpo.space.train.weight_decay={uniform: [0.0, 0.1]}",  # a new one beside it
        "resources.spot=true", "storage.artifacts=./out")))
    space = spec.pipeline[0].space  # type: ignore[attr-defined]
    assert list(space["train.lr"].log_uniform) == [1e-5, 1e-3]
    assert set(space) == {"train.lr", "train.weight_decay"}
    assert spec.resources.spot is True and spec.storage.artifacts == "./out"


@pytest.mark.parametrize(("item", "expected"), [
    ("budget.max_usd=abc", "--set budget.max_usd=abc: budget.max_usd: amount 'abc' is not a dollar figure"),
    ("budget.max_usdd=3",
     "--set budget.max_usdd=3: budget.max_usdd: unknown field 'max_usdd'; did you mean 'max_usd'?"),
    ("steps.1.lr=3", "--set steps.1.lr=3: steps.1 is a train step; write steps.1.train.lr"),
    ("steps.1.prune.sparsity=0.5", "--set steps.1.prune.sparsity=0.5: steps.1 is a train step, not prune"),
    ("steps.5.train.lr=3", "--set steps.5.train.lr=3: steps has 2 item(s), numbered from 0; there is no steps.5"),
    ("name.x=3", "--set name.x=3: name is a single value ('quick'), not a mapping; set name itself"),
    ("budget", "--set budget: write --set PATH=VALUE"),
    ("a..b=1", "--set a..b=1: 'a..b' is not a field path"),
    ("teardown=[", "--set teardown=[: not a YAML value"),
])
def test_a_bad_set_is_one_line_naming_the_path(spec_file: Path, item: str, expected: str) -> None:
    errors = _errors(spec_file, Layers(sets=(item,)))
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_a_bad_name_names_the_option(spec_file: Path) -> None:
    (line,) = _errors(spec_file, Layers(name="Bad Name"))
    assert line.startswith("--name Bad Name: name: use lowercase letters")


def test_user_config_fills_what_the_spec_leaves_out(spec_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    loaded = load_layered(spec_file, Layers(defaults=config))
    spec = loaded.spec
    assert (spec.resources.cloud, spec.resources.region, spec.storage.artifacts, spec.teardown) == \
        ("aws", "us-east-1", "s3://my-bucket/optjob", "on_success")
    assert (spec.budget.max_usd, spec.budget.max_hours) == (20.0, 1.0)  # merged key by key: the spec's stays
    assert loaded.describe() == [f"defaults from {config}: resources.cloud=aws, resources.region=us-east-1, "
                                 "storage.artifacts=s3://my-bucket/optjob, budget.max_usd=20, teardown=on_success"]


def test_the_spec_and_the_command_line_win_over_the_user_config(spec_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    spec_file.write_text(SPEC + "teardown: always\nresources: {cloud: gcp}\n")
    loaded = load_layered(spec_file, Layers(sets=("budget.max_usd=3",), defaults=config))
    spec = loaded.spec
    assert spec.teardown == "always" and spec.budget.max_usd == 3.0
    # The config's region belongs to its cloud: a spec on gcp does not get us-east-1.
    assert spec.resources.cloud == "gcp" and spec.resources.region is None
    assert loaded.describe()[0] == f"defaults from {config}: storage.artifacts=s3://my-bucket/optjob"
    # --set counts as the spec: --set resources.cloud=gcp keeps the aws region out too.
    spec_file.write_text(SPEC)
    assert load_spec(spec_file, Layers(sets=("resources.cloud=gcp",), defaults=config)).resources.region is None


def test_user_config_is_validated_strictly_naming_the_file(spec_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("resources: {clod: aws}\n")
    (line,) = _errors(spec_file, Layers(defaults=config))
    assert line == f"{config}:1:13: resources.clod: unknown key 'clod'; did you mean 'cloud'?"
    config.write_text("resources: {accelerators: A100:1}\n")
    (line,) = _errors(spec_file, Layers(defaults=config))
    assert line.startswith(f"{config}:1:13: resources.accelerators: unknown key 'accelerators'; "
                           "the user config sets only resources.cloud")
    config.write_text("teardown: sometimes\n")
    (line,) = _errors(spec_file, Layers(defaults=config))
    assert line.startswith(f"{config}:1:11: teardown: Input should be")
    config.write_text("# nothing yet\n")  # comments only: no defaults
    assert load_layered(spec_file, Layers(defaults=config)).describe() == []


def test_a_config_value_the_spec_rejects_points_at_the_config(spec_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("resources:\n  cloud: aws\n")
    spec_file.write_text(SPEC + "resources: {spot: true}\n")  # spot on a cloud needs s3 storage
    (line,) = _errors(spec_file, Layers(defaults=config))
    assert line.startswith(f"{spec_file}:") and "storage.artifacts" in line


def test_loads_spec_keeps_its_source_in_errors() -> None:
    with pytest.raises(SpecError) as exc:
        loads_spec("name: x\nmodel: {init: {}}\nsteps: [{train: {lr: 0}}]\n", source="s.yaml")
    assert exc.value.errors[0].startswith("s.yaml:3:")
