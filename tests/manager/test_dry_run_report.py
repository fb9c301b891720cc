"""A dry run says what it verified and what it could not (issue 18, item 8): a hub model it cannot
reach, a bucket or a cloud without credentials here, CUDA-only paths; the verdict counts them.

Two dry runs go through `apply --dry-run` with the real workload on a tiny proxy (a hub model not in
the local cache; everything local); the rest is ``dry_run_report.build`` on the events such a run
writes, with the environment, home folder and bucket probe injected. The one network test reads a
bucket at a closed port on 127.0.0.1 (refused at once)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from optjob.manager.commands import apply as apply_cmd
from optjob.manager.dry_run_report import build, cached_file, probe_bucket
from optjob.manager.local_credentials import bucket_credentials, cloud_credentials
from optjob.manager.planner import make_plan
from optjob.specs import loads_spec

CLOUD = """name: cloudy
model: {hf: some-org/some-model, params: 100000000}
steps:
  - train: {max_steps: 100, adapter: {method: qlora}}
  - quantize: {method: int8-weight}
resources: {cloud: aws, accelerators: "A100:8"}
storage: {artifacts: "s3://bucket/prefix"}
"""
#: What the workload of a dry run of CLOUD writes (check, step_done, checkpoint events).
EVENTS: list[dict[str, Any]] = [
    {"event": "check", "what": "stand_in", "ok": True, "model": {"family": "llama", "layers": 2, "hidden": 64}},
    {"event": "checkpoint", "index": 0, "kind": "train", "step": 2},
    {"event": "check", "what": "reload", "ok": True, "index": 0, "kind": "train"},
    {"event": "step_done", "index": 0, "kind": "train", "skipped": False},
    {"event": "check", "what": "reload", "ok": True, "index": 1, "kind": "quantize"},
    {"event": "step_done", "index": 1, "kind": "quantize", "skipped": False},
    {"event": "check", "what": "tasks", "ok": True, "index": 1, "kind": "evaluate", "skipped": ["hellaswag"],
     "detail": "lm-eval registry tasks download their datasets on the node: not run by a dry run"},
]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def report(text: str, env: dict[str, str], home: Path, probe: Any = None, **kw: Any) -> Any:
    spec = loads_spec(text)
    probed: list[str] = []

    def fake_probe(url: str, endpoint: str | None) -> str | None:
        probed.append(url)
        return None

    r = build(spec, "spec.yaml", make_plan(spec), EVENTS, env=env, home=home, probe=probe or fake_probe, **kw)
    r.probed = probed
    return r


def test_what_a_cloud_spec_could_not_verify_is_listed_and_counted(hub: Path, tmp_path: Path) -> None:
    r = report(CLOUD, env={}, home=tmp_path)
    missing = "\n".join(r.not_verified)
    assert "hub model some-org/some-model: not in the local Hugging Face cache" in missing
    assert "a tiny model stood in (llama" in missing
    assert "bucket s3://bucket/prefix: not checked, no aws credentials found here" in missing
    assert "aws credentials: none found here" in missing
    assert "QLoRA's 4-bit loading needs a CUDA GPU; rehearsed as LoRA" in missing
    assert "8 GPU(s) (DDP): the dry run is one process" in missing
    assert "resume after a preemption: no preemption was rehearsed; add --simulate-preemption 1" in missing
    assert "steps[1] evaluate: tasks hellaswag: lm-eval registry tasks download their datasets" in missing
    assert r.probed == []  # no credentials: the bucket is not even tried
    assert r.verdict() == f"dry run passed with {len(r.not_verified)} things not verified"
    done = "\n".join(r.verified)
    assert "2 of 2 steps ran on a stand-in, a tiny llama model (2 layers, 64 wide)" in done
    assert "reloads with AutoModelForCausalLM.from_pretrained (2 folders)" in done
    assert "checkpoints written (1)" in done and "plan priced: aws" in done
    assert all("\n" not in line for line in r.verified + r.not_verified)  # one line each


def test_a_cached_hub_model_credentials_and_a_bucket_that_answers_are_verified(hub: Path, tmp_path: Path) -> None:
    snapshot = hub / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\n")
    r = report(CLOUD, env={}, home=tmp_path, kills=1, kills_done=1)
    done, missing = "\n".join(r.verified), "\n".join(r.not_verified)
    assert "hub model some-org/some-model: config in the local cache" in done and "some-model" not in missing
    assert f"bucket s3://bucket/prefix: answered a read (credentials from {tmp_path / '.aws' / 'credentials'})" in done
    assert r.probed == ["s3://bucket/prefix"]
    assert "aws credentials present" in done and "aws credentials" not in missing
    assert "resume from a checkpoint rehearsed (1 kill survived)" in done and "resume" not in missing
    assert cached_file("some-org/some-model", "config.json") == snapshot / "config.json"


def test_credentials_are_found_in_the_environment_and_the_sdks_files_only(tmp_path: Path) -> None:
    assert cloud_credentials("aws", {}, tmp_path) is None
    assert cloud_credentials("aws", {"AWS_ACCESS_KEY_ID": "a"}, tmp_path) is None  # the secret is missing
    assert cloud_credentials("aws", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, tmp_path) == \
        "env AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    adc = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    assert cloud_credentials("gcp", {}, tmp_path) == str(adc)
    assert bucket_credentials("gs", {}, tmp_path) == str(adc)
    assert bucket_credentials("az", {"AZURE_STORAGE_CONNECTION_STRING": "x"}, tmp_path) == \
        "env AZURE_STORAGE_CONNECTION_STRING"
    assert cloud_credentials("kubernetes", {}, tmp_path) is None


def test_a_bucket_that_cannot_be_reached_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    why = probe_bucket("s3://bucket/prefix", f"http://127.0.0.1:{port}", timeout_s=30)
    assert why is not None and "127.0.0.1" in why


# ---- through `apply --dry-run`, with the real workload -------------------------------------------

LOCAL = """name: {name}
model: {model}
data: {{source: {text}, seq_len: 16}}
steps:
  - quantize: {{method: int8-weight}}
  - evaluate: {{max_batches: 2, latency_repeats: 1, generate_tokens: 2}}
"""


def dry_run(tmp_path: Path, name: str, model: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i % 13}." for i in range(6000)))
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(LOCAL.format(name=name, model=model, text=text))
    apply_cmd.apply_command(str(spec), local=False, dry_run=True, yes=True, detach=False, as_json=False)
    out = capsys.readouterr().out
    apply_cmd.apply_command(str(spec), local=False, dry_run=True, yes=True, detach=False, as_json=True)
    return out, json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]


def test_a_dry_run_of_a_hub_model_it_cannot_reach_says_so(home: Path, hub: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, checked = dry_run(tmp_path, "hubby", "{hf: nobody-here/not-a-model, params: 1000000}", capsys)
    lines = out.splitlines()
    at = lines.index("dry run could not verify:")
    assert any(line.startswith("  --  hub model nobody-here/not-a-model: not in the local Hugging Face cache")
               for line in lines[at:]), out
    assert lines[-1].startswith(f"dry run passed with {len(checked['not_verified'])} thing")
    assert checked["verdict"] == "dry run passed with 1 thing not verified"
    assert "nobody-here/not-a-model" in checked["not_verified"][0]


def test_a_dry_run_where_everything_is_local_verifies_everything(home: Path, hub: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, checked = dry_run(tmp_path, "local", "{init: {layers: 1, hidden: 32, heads: 2, vocab: 300}}", capsys)
    assert checked["not_verified"] == [] and checked["verdict"] == "dry run passed"
    assert "dry run could not verify:" not in out
    assert out.splitlines()[-1].startswith("dry run passed")
    assert any("2 of 2 steps ran on a stand-in" in v for v in checked["verified"])
    assert any("every step's output reloads with AutoModelForCausalLM.from_pretrained (1 folder)" in v
               for v in checked["verified"]), checked


def test_a_plan_no_offer_matches_is_not_verified(hub: Path, tmp_path: Path) -> None:
    r = report(CLOUD.replace("A100:8", "A100:3"), env={}, home=tmp_path)
    assert any(line.startswith("plan: not priced (no offer matches resources)") for line in r.not_verified)
    assert not any(line.startswith("plan priced") for line in r.verified)


def test_a_compare_counts_and_reloads_every_variant_step(tmp_path: Path) -> None:
    """A compare's variant steps share the compare step's index: the report counted them as one step
    ("4 of 2 steps ran") and their outputs as one folder."""
    spec = loads_spec("""name: cmp
model: {init: {layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
steps:
  - train: {max_steps: 4}
  - compare: {a: [{prune: {sparsity: 0.5}}], b: [{quantize: {method: fp16}}, {evaluate: {}}]}
""")
    events: list[dict[str, Any]] = [{"event": "step_done", "index": 0, "kind": "train", "skipped": False}]
    for variant, j, kind in (("a", 0, "prune"), ("b", 0, "quantize"), ("b", 1, "evaluate")):
        events.append({"event": "step_done", "index": 1, "kind": kind, "variant": variant, "variant_step": j,
                       "skipped": False})
        if kind != "evaluate":
            events.append({"event": "check", "what": "reload", "ok": True, "index": 1, "kind": kind,
                           "variant": variant, "variant_step": j})
    events.append({"event": "check", "what": "reload", "ok": True, "index": 0, "kind": "train"})
    r = build(spec, "cmp.yaml", make_plan(spec, local=True), events, env={}, home=tmp_path)
    done = "\n".join(r.verified)
    assert "4 of 4 steps ran on a stand-in" in done and "0:train, 1:prune (a), 1:quantize (b), 1:evaluate (b)" in done
    assert "reloads with AutoModelForCausalLM.from_pretrained (3 folders)" in done
