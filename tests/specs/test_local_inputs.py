"""Local inputs are checked when the spec is read, not after a paid launch (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optjob.specs import SpecError, load_spec


def write(tmp_path: Path, body: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: local\nsteps: [{train: {}}]\n" + body)
    return spec


def test_a_missing_model_folder_or_data_file_is_one_line_naming_its_place(tmp_path: Path) -> None:
    spec = write(tmp_path, "model: {path: ./models/mine}\ndata: {source: ./corpus.txt}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    lines = err.value.errors
    assert lines[0].startswith(f"{spec}:3:15: model.path: {tmp_path / 'models' / 'mine'} does not exist")
    assert lines[1].startswith(f"{spec}:4:16: data.source: {tmp_path / 'corpus.txt'} does not exist")
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "validate", str(spec)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_paths_are_relative_to_the_spec_folder_not_the_working_directory(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "corpus.txt").write_text("hello world\n" * 100)
    spec = write(tmp_path, "model: {path: ./models/mine}\ndata: {source: ./corpus.txt}\n")
    monkeypatch.chdir("/")
    assert load_spec(spec).model.path == "./models/mine"


def test_plan_reads_a_local_config_json_for_the_model_section(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16"}))
    spec = write(tmp_path, "model: {path: ./models/mine}\n")
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(spec), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    model = plan["model"]
    assert (model["source"], model["family"], model["layers"], model["hidden"], model["kv_heads"], model["vocab"]) \
        == ("config.json", "qwen2", 3, 128, 2, 1000)
    assert model["dtype"] == "16-bit" and model["params"] > 0
    assert not any("param count unknown" in note for note in plan["notes"])  # not "assumed 1B"


def test_a_step_the_family_cannot_take_is_refused_at_plan_with_a_hint_for_that_step(tmp_path: Path) -> None:
    spec = write(tmp_path, "model: {init: {family: gpt2, layers: 2, hidden: 64, heads: 4, vocab: 512}}\n")
    prune = "{prune: {method: structured, heads_fraction: 0.5}}"
    spec.write_text(spec.read_text().replace("steps: [{train: {}}]", f"steps: [{{train: {{}}}}, {prune}]"))
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "plan", str(spec)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "steps[1].prune" in line and "heads_fraction: 0" in line and "\n" not in line
