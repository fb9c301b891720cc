"""Issue 13, item 8: a file the workload reads back (done.json, results.json, a checkpoint's
manifest.json and meta.json, the same files pulled from artifact storage) that is valid JSON but
not the record it should be — ``[]``, ``{"index": 0}``, wrong types — or torn JSON means "run
that step again" (or "skip that checkpoint") with one line on stderr, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from optjob.steps import checkpoint as ckpt
from optjob.steps import records, runner
from optjob.steps.events import parse_event
from optjob.steps.layout import JobFile, sha256_file, step_dir
from optjob.steps.storage import LocalStorage
from optjob.steps.sync import Sync

DONE = {"index": 0, "kind": "train", "output": None, "metrics": {"steps": 4}, "wall_s": 1.5, "extra": {},
        "attempt": 1, "fingerprint": "abc"}
#: Valid JSON that is not a done.json record of steps[0] (train), and JSON that is not valid at all.
NOT_DONE = {
    "list": b"[]",
    "index-only": b'{"index": 0}',
    "null": b"null",
    "string-index": json.dumps({**DONE, "index": "0"}).encode(),
    "metrics-list": json.dumps({**DONE, "metrics": [1, 2]}).encode(),
    "bool-wall": json.dumps({**DONE, "wall_s": True}).encode(),
    "output-number": json.dumps({**DONE, "output": 7}).encode(),
    "truncated": json.dumps(DONE).encode()[:40],
    "empty": b"",
}


@pytest.mark.parametrize("data", NOT_DONE.values(), ids=NOT_DONE.keys())
def test_a_done_json_that_is_not_a_record_is_one_line(data: bytes):
    with pytest.raises(records.InvalidRecord) as info:
        records.parse(records.DoneRecord, data, "steps/00-train/done.json")
    line = str(info.value)
    assert line.startswith("steps/00-train/done.json: ") and "\n" not in line


def test_valid_records_parse_and_keep_unknown_keys():
    done = records.parse(records.DoneRecord, json.dumps({**DONE, "from_the_future": 1}), "x")
    assert done.index == 0 and done.model_dump(mode="json")["from_the_future"] == 1
    old = {k: v for k, v in DONE.items() if k != "fingerprint"}  # written before fingerprints
    assert records.parse(records.DoneRecord, json.dumps(old), "x").fingerprint is None
    assert records.parse(records.DoneRecord, json.dumps({**DONE, "wall_s": 2}), "x").wall_s == 2.0
    hpo = {**DONE, "kind": "hpo", "extra": {"overrides": {"train": {"lr": 0.01}, "model.init": {}}}}
    assert records.parse(records.DoneRecord, json.dumps(hpo), "x").extra["overrides"]["train"] == {"lr": 0.01}
    results = {"name": "tiny", "steps": [{k: DONE[k] for k in ("index", "kind", "output", "metrics", "wall_s",
                                                            "extra")}], "baseline": {"eval_loss": 6.0}}
    assert records.parse(records.ResultsFile, json.dumps(results), "x").baseline == {"eval_loss": 6.0}


@pytest.mark.parametrize("model, data, words", [
    (records.DoneRecord, json.dumps({**DONE, "kind": "hpo", "extra": {"overrides": []}}), "extra.overrides"),
    (records.DoneRecord, json.dumps({**DONE, "kind": "hpo", "extra": {}}), "extra.overrides"),
    (records.ResultsFile, "[]", "object"),
    (records.ResultsFile, '{"name": 5}', "name"),
    (records.ResultsFile, '{"name": "tiny", "baseline": [1]}', "baseline"),
    (records.ResultsFile, '{"name": "tiny", "steps": [{"index": 0}]}', "steps.0"),
    (records.CheckpointManifest, '{"files": "meta.json"}', "CheckpointManifest"),
    (records.CheckpointManifest, '{"step": 1, "files": {"../../etc/passwd": "' + "0" * 64 + '"}}', "files"),
    (records.CheckpointManifest, '{"step": 1, "files": {"model.pt": "' + "0" * 64 + '"}}', "meta.json"),
    (records.CheckpointManifest, '{"step": 1, "files": {"meta.json": "beef"}}', "files"),
    (records.CheckpointMeta, '{"step": "4"}', "step"),
    (records.CheckpointMeta, '{"step": 4, "losses": {"1": 2.0}}', "losses"),
    (records.CheckpointMeta, '{"step": 4, "bad": 1.5}', "bad"),
])
def test_other_records_refuse_the_wrong_shape(model: type[Any], data: str, words: str):
    with pytest.raises(records.InvalidRecord, match=words):
        records.parse(model, data, "f.json")


# ------------------------------------------------------------------------------ checkpoints

def save(root: Path, step: int, meta: dict[str, Any] | None = None) -> Path:
    return ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((3,), float(step))}},
                                {"losses": [(step, 1.0)], "evals": [], "best": None, "bad": 0, **(meta or {})})


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace ``name`` in the checkpoint and re-sign the manifest, as a writer of bad records would."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("manifest", [
    b"[]", b'{"files": "meta.json"}', b'{"files": ["meta.json"]}', b'{"step": 6}', b'{"step": "6", "files": {}}',
    b'{"step": 5, "files": {}}', b'{"step": 6, "fil',
], ids=["list", "files-string", "files-list", "no-files", "string-step", "other-step", "truncated"])
def test_a_bad_manifest_skips_the_checkpoint(tmp_path: Path, manifest: bytes, capsys: pytest.CaptureFixture[str]):
    first, newest = save(tmp_path, 3), save(tmp_path, 6)
    (newest / ckpt.MANIFEST).write_bytes(manifest)
    assert not ckpt.verify(newest)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert "step-000006 is incomplete or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("meta", [
    b"[]", b'{"losses": []}', b'{"step": 6, "losses": "none"}', b'{"step": 6, "best": "low"}', b'{"step": 9}',
], ids=["list", "no-step", "losses-string", "best-string", "other-step"])
def test_a_bad_meta_behind_a_good_checksum_skips_the_checkpoint(tmp_path: Path, meta: bytes):
    first, newest = save(tmp_path, 3), save(tmp_path, 6)
    rewrite(newest, "meta.json", meta)
    assert not ckpt.verify(newest) and ckpt.latest_checkpoint(tmp_path) == first
    parts, loaded = ckpt.load_checkpoint(first)
    assert loaded == {"step": 3, "losses": [(3, 1.0)], "evals": [], "best": None, "bad": 0}
    assert torch.equal(parts["model"]["w"], torch.full((3,), 3.0))


def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path):
    outside = tmp_path / "secret"
    outside.write_text("x")
    newest = save(tmp_path / "c", 6)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    manifest["files"]["../../secret"] = sha256_file(outside)
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert not ckpt.verify(newest)


# ------------------------------------------------------------------------------ the runner

@pytest.fixture
def job(tmp_path: Path, shared_cache: Path, tiny_spec: Callable[..., dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch, restore_signals: None) -> Path:
    monkeypatch.delenv("OPTJOB_STORAGE", raising=False)
    monkeypatch.delenv("OPTJOB_DEADLINE", raising=False)
    spec = tiny_spec(steps=[{"train": {"max_steps": 6, "lr": 3e-3, "batch_size": 4, "checkpoint_every": 4,
                                       "log_every": 3}},
                            {"evaluate": {"metrics": ["perplexity"], "max_batches": 2}}])
    quick = {"auto_evaluate": {"metrics": ["perplexity"], "max_batches": 2}}
    folder = tmp_path / "job"
    JobFile(spec=spec, device="cpu", cache_dir=str(shared_cache), extra=quick).write(folder)
    return folder


def run_main(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]], str]:
    code = runner.main(["run", str(folder)])
    out = capsys.readouterr()
    return code, [e for e in map(parse_event, out.out.splitlines()) if e is not None], out.err


def ran(events: list[dict[str, Any]]) -> list[int]:
    """Indices of the steps that ran (not skipped as done)."""
    return [e["index"] for e in events if e["event"] == "step_done" and not e["skipped"]]


def test_invalid_done_json_reruns_the_step(job: Path, capsys: pytest.CaptureFixture[str]):
    code, events, err = run_main(job, capsys)
    assert code == 0, err
    done_path = step_dir(job, 1, "evaluate") / "done.json"
    good = json.loads(done_path.read_bytes())
    variants = {**NOT_DONE, "another-step": json.dumps({**good, "index": 0, "kind": "train"}).encode()}
    for label, data in variants.items():
        done_path.write_bytes(data)
        code, events, err = run_main(job, capsys)
        assert code == 0, f"{label}: {err}"
        assert ran(events) == [1], label  # train is done and kept; evaluate runs again
        warning = [line for line in err.splitlines() if "done.json" in line]
        assert len(warning) == 1 and "steps[1] (evaluate) runs again" in warning[0], (label, err)
        records.read(records.DoneRecord, done_path)  # rewritten whole by the rerun
        assert (done_path.parent / "done.json.invalid").read_bytes() == data  # kept aside, not re-read
    # The train step's own done.json: it runs again (from its newest checkpoint), and so does the rest.
    train_done = step_dir(job, 0, "train") / "done.json"
    train_done.write_bytes(b'{"index": 0}')
    code, events, err = run_main(job, capsys)
    assert code == 0, err
    assert ran(events) == [0, 1] and "steps[0] (train) runs again" in err
    assert records.read(records.DoneRecord, train_done).metrics["steps"] == 6


@pytest.mark.parametrize("data", [b"[]", b'{"name": 5}', b'{"name": "tiny", "baseline": [1, 2]}', b'{"name": "ti'],
                         ids=["list", "name-number", "baseline-list", "truncated"])
def test_invalid_results_json_is_written_afresh(job: Path, capsys: pytest.CaptureFixture[str], data: bytes):
    code, _, err = run_main(job, capsys)
    assert code == 0, err
    results = job / "results.json"
    results.write_bytes(data)
    code, events, err = run_main(job, capsys)
    assert code == 0, err
    assert ran(events) == []  # every step is done: only the baseline is measured again
    assert "results.json" in err and "written afresh" in err
    again = records.read(records.ResultsFile, results)
    assert again.baseline and [s.kind for s in again.steps] == ["train", "evaluate"]


# ------------------------------------------------------------------------------ sync (artifact storage)

def finished_step(node: Path, done: bytes) -> None:
    folder = step_dir(node, 0, "prune")
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "w").write_text("pruned")
    (folder / "done.json").write_bytes(done)


def valid_prune_done(node: Path) -> bytes:
    record = {**DONE, "kind": "prune", "output": str(step_dir(node, 0, "prune") / "model")}
    return json.dumps(record).encode()


@pytest.mark.parametrize("data", [b"[]", b'{"index": 0}', b'{"index": 0, "kind": "prune", "output": 5}',
                                  json.dumps({**DONE, "kind": "train"}).encode(), b'{"ind'],
                         ids=["list", "index-only", "output-number", "other-kind", "truncated"])
def test_pull_treats_an_invalid_done_json_in_storage_as_unfinished(tmp_path: Path, data: bytes,
                                                                   capsys: pytest.CaptureFixture[str]):
    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "a"
    finished_step(node, data)
    Sync(store, node).push_steps()
    store.put_bytes("results.json", b"[]")
    fresh = tmp_path / "b"
    got = Sync(store, fresh).pull()
    assert got["steps"] == [] and got["results"] is False
    assert not (step_dir(fresh, 0, "prune") / "done.json").exists()
    assert not (fresh / "results.json").exists()
    err = capsys.readouterr().err
    assert "done.json" in err and "the step runs again" in err and "results.json" in err


def test_pull_replaces_an_invalid_local_done_json(tmp_path: Path):
    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "a"
    finished_step(node, valid_prune_done(node))
    Sync(store, node).push_steps()
    fresh = tmp_path / "b"
    (step_dir(fresh, 0, "prune")).mkdir(parents=True)
    (step_dir(fresh, 0, "prune") / "done.json").write_bytes(b"[]")  # torn on this node
    assert Sync(store, fresh).pull()["steps"] == ["00-prune"]
    done = records.read(records.DoneRecord, step_dir(fresh, 0, "prune") / "done.json")
    assert done.output == str(step_dir(fresh, 0, "prune") / "model")


def test_pull_skips_a_local_checkpoint_with_a_bad_manifest(tmp_path: Path):
    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "a"
    sync = Sync(store, node)
    root = step_dir(node, 0, "train") / "checkpoints"
    sync.push_checkpoint(save(root, 4), 4)
    fresh = tmp_path / "b"
    here = save(step_dir(fresh, 0, "train") / "checkpoints", 8)
    (here / ckpt.MANIFEST).write_bytes(b'{"files": "meta.json"}')  # newer, but not a manifest
    assert Sync(store, fresh).pull()["checkpoints"] == ["00-train/step-000004"]
