"""Every example validates, the schema is generated from the models and kept in docs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optjob.specs import JobSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_and_points_at_schema(path: Path):
    spec = load_spec(path)
    assert spec.name
    assert path.read_text().startswith("# yaml-language-server: $schema=../docs/optjob.schema.json")


def test_examples_exist():
    assert len(EXAMPLES) >= 1


def test_schema_file_matches_models():
    on_disk = json.loads((ROOT / "docs" / "optjob.schema.json").read_text())
    assert on_disk == JobSpec.model_json_schema(), "run: optjob schema > docs/optjob.schema.json"


def test_every_field_is_described():
    schema = JobSpec.model_json_schema()
    missing = [
        f"{name}.{field}"
        for name, model in schema["$defs"].items()
        for field, prop in model.get("properties", {}).items()
        if "description" not in prop
    ]
    missing += [f"JobSpec.{f}" for f, p in schema["properties"].items() if "description" not in p]
    assert not missing, missing
