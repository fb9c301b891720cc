"""Hostile input: bombs, huge and deep documents, garbage and wrong encodings are refused fast
with one clear line and bounded memory; strings that reach a shell or a path on the node are
validated by pattern or quoted, so injection attempts neither run nor escape the job folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.controller import resolve_paths
from optjob.providers.base import LaunchRequest
from optjob.providers.local import LocalProvider
from optjob.providers.sky_task import task_config
from optjob.specs import JobSpec, SpecError, load_spec, loads_spec
from reliability_harness import Cli, standin_spec, wait_for

GOOD = "name: tiny\nmodel: {init: {layers: 2, hidden: 64, heads: 2, vocab: 512}}\nsteps: [{train: {}}]\n"


def bomb(levels: int = 9, width: int = 10) -> str:
    doc = "a: &a [" + ",".join(["x"] * width) + "]\n"
    for i in range(1, levels):
        prev, cur = chr(97 + i - 1), chr(97 + i)
        doc += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * width) + "]\n"
    return doc


def merge_bomb(levels: int = 30) -> str:
    doc = "a0: &a0 {k: v}\n"
    for i in range(1, levels):
        doc += f"a{i}: &a{i} {{<<: [*a{i - 1}], k{i}: [*a{i - 1}, *a{i - 1}]}}\n"
    return doc


def refused(doc: str | bytes, words: str, *, peak_mb: float, seconds: float = 10.0) -> str:
    """``doc`` is refused with one SpecError containing ``words``; memory and time stay bounded."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        with pytest.raises(SpecError) as info:
            loads_spec(doc, "<doc>")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert words in message, message
    assert message.startswith("<doc>") and "\n" not in message and "Traceback" not in message
    assert peak < peak_mb * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < seconds, f"{elapsed:.1f}s"  # a bound against blow-up, not a timing
    return message


@pytest.mark.parametrize("doc, words", [
    (bomb(), "aliases expand"),
    (merge_bomb(), "aliases expand"),
    ("[" * 10_000 + "]" * 10_000, "nested deeper"),
    ("{a: " * 10_000 + "}" * 10_000, "nested deeper"),
    ("- " * 10_000 + "x", "nested deeper"),
    ("&a [" * 10_000, "nested deeper"),
], ids=["alias-bomb", "merge-bomb", "deep-flow-list", "deep-flow-map", "deep-block", "deep-anchored"])
def test_bombs_and_deep_nesting(doc: str, words: str):
    refused(doc, words, peak_mb=8)


def test_fifty_megabytes_is_refused_before_reading(tmp_path: Path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(50 * 2**20)  # sparse: 50 MB on paper
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match="at most 1,000,000"):
            load_spec(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # never read
    data = b"name: x\n" + b"#" * (50 * 2**20)
    refused(data, "at most 1,000,000", peak_mb=1)
    refused(data.decode(), "at most 1,000,000", peak_mb=1)
    refused(b"a" * 1_000_001, "at most 1,000,000", peak_mb=1)


ENCODED = [
    pytest.param(raw, id=f"{label}-{encoding}")
    for label, text in (("accents", "name: tiny  # café “quoted” テスト\nmodel: {init: {}}\nsteps: [{train: {}}]\n"),
                        ("ascii", "name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n"))
    for encoding in ("latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32", "shift_jis", "gb18030")
    if (raw := text.encode(encoding, errors="replace")) != text.encode()  # ASCII: only the wide ones differ
]


@pytest.mark.parametrize("raw", ENCODED)
def test_wrong_encodings(tmp_path: Path, raw: bytes):
    text = "name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n"
    f = tmp_path / "spec.yaml"
    f.write_bytes(raw)
    with pytest.raises(SpecError, match=r"not UTF-8|NUL bytes") as info:
        load_spec(f)
    assert str(info.value).startswith(str(f))
    f.write_bytes(text.encode("utf-8-sig"))  # UTF-8 with a BOM is fine
    assert load_spec(f).name == "tiny"


def test_binary_garbage():
    rng = random.Random(0)
    refused(rng.randbytes(900_000), "not UTF-8", peak_mb=8)
    refused(bytes(rng.randrange(1, 128) for _ in range(200_000)) + b"\x00", "NUL", peak_mb=8)
    printable = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(200_000))
    refused(printable, "<doc>", peak_mb=64, seconds=30)  # valid text, not YAML: still one line


NEAR_LIMIT = r"""
import resource, sys, time
from optjob.specs import SpecError, loads_spec
doc = sys.stdin.read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    loads_spec(doc)
    result = "accepted"
except SpecError as exc:
    result = str(exc)
print(result)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
print(time.perf_counter() - t)
"""


def test_largest_documents_within_the_limits_stay_bounded():
    """The worst the limits allow (about 1 MB, 99,000 nodes) costs seconds and tens of MB, not more."""
    doc = "x: [" + ",".join(["1"] * 99_000) + "]\n"
    proc = subprocess.run([sys.executable, "-c", NEAR_LIMIT], input=doc, capture_output=True, text=True, timeout=120)
    message, grown, seconds = proc.stdout.splitlines()
    assert "unknown field 'x'" in message or "required" in message, message
    assert int(grown) < 400 * 2**20, f"RSS grew {int(grown) / 2**20:.0f} MiB"
    assert float(seconds) < 60


# ---- injection ---------------------------------------------------------------------------------

PAYLOADS = ["; rm -rf ~", "$(touch CANARY)", "`touch CANARY`", "../../etc", "a b", "x\ny", "x'y", 'x"y',
            "-rf", "..", "a|b", "a&&b", "a>b", "$HOME", "*"]


def doc_with(field: str, value: str) -> str:
    q = json.dumps(value)  # a YAML double-quoted scalar
    return {
        "name": f"name: {q}\nmodel: {{init: {{}}}}\nsteps: [{{train: {{}}}}]\n",
        "region": GOOD + f"resources: {{cloud: aws, region: {q}}}\n",
        "zone": GOOD + f"resources: {{cloud: aws, zone: {q}}}\n",
        "hf": f"name: x\nmodel: {{hf: {q}}}\nsteps: [{{train: {{}}}}]\n",
        "accelerators": GOOD + f"resources: {{cloud: aws, accelerators: {json.dumps(value + ':1')}}}\n",
        "data.source(hf)": GOOD + f"data: {{source: {json.dumps('hf:' + value)}}}\n",
        "data.source(hf org)": GOOD + f"data: {{source: {json.dumps('hf:org/' + value)}}}\n",
    }[field]


@pytest.mark.parametrize("field", ["name", "region", "zone", "hf", "accelerators", "data.source(hf)",
                                   "data.source(hf org)"])
def test_names_that_reach_a_shell_or_a_path_are_patterns(field: str):
    for payload in PAYLOADS:
        with pytest.raises(SpecError) as info:
            loads_spec(doc_with(field, payload))
        assert "\n" not in str(info.value)


def hostile_spec(canary: Path, tmp_path: Path) -> JobSpec:
    """Free-text fields (paths, a local artifacts folder) carrying shell payloads: valid as paths."""
    run = f"$(touch {canary})"
    return loads_spec(
        "name: evil\n"
        f"model: {{init: {{}}, tokenizer: {json.dumps('./tok; touch ' + str(canary))}}}\n"
        f"data: {{source: {json.dumps('../../data`touch ' + str(canary) + '`' + run + '.txt')}}}\n"
        "steps: [{train: {}}]\n"
        f"storage: {{artifacts: {json.dumps(str(tmp_path / ('art' + run)))}}}\n")


def test_free_text_paths_never_reach_the_launch_shell(home: Path, tmp_path: Path):
    canary = tmp_path / "CANARY"
    spec = hostile_spec(canary, tmp_path)
    resolved = resolve_paths(spec, tmp_path / "specs" / "here")
    source = resolved["data"]["source"]
    assert os.path.isabs(source) and ".." not in Path(source).parts  # made absolute, normalised
    assert resolved["model"]["tokenizer"].startswith(str(tmp_path))
    # The local launch: the workload's argv is fixed; only the (validated) job folder comes from the spec.
    recorder = tmp_path / "record-argv"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    job_dir = paths.job_dir(spec.name)
    job_dir.mkdir(parents=True)
    provider = LocalProvider(python=str(recorder))
    provider.launch(LaunchRequest(spec=spec, job_dir=job_dir, attempt=1, env={"OPTJOB_X": "$(touch CANARY)"}))
    argv = json.loads(wait_for(lambda: (tmp_path / "argv.json").exists() and (tmp_path / "argv.json").read_text(),
                               what="the recorder"))
    assert argv == ["-u", "-m", "optjob.steps", "run", str(job_dir)]
    assert job_dir.parent == paths.jobs_dir()
    assert not canary.exists() and not (job_dir / "CANARY").exists()


def test_free_text_reaches_sky_only_as_data(tmp_path: Path):
    canary = tmp_path / "CANARY"
    spec = loads_spec(
        "name: evil\nmodel: {init: {}}\nsteps: [{train: {}}]\n"
        "resources: {cloud: aws, spot: true, accelerators: A100:1, region: us-east-1}\n"
        f"storage: {{artifacts: {json.dumps('s3://bucket/p$(touch${IFS}' + str(canary) + ')`id`;x')}}}\n"
        f"data: {{source: {json.dumps('/data/$(touch ' + str(canary) + ').txt')}}}\n")
    config = task_config(spec, attempt=1, env={"OPTJOB_DEADLINE": "123", "OPTJOB_EVIL": "$(id)"},
                         job_file=tmp_path / "job.json", wheel=tmp_path / "optjob-0.1.0-py3-none-any.whl")
    scripts = config["setup"] + config["run"]
    for needle in ("$(touch", "`id`", str(canary), "$(id)"):
        assert needle not in scripts
    assert config["name"] == "optjob-evil"
    # The artifacts URL is an environment value (SkyPilot passes envs as data, not shell text).
    assert config["envs"]["OPTJOB_STORAGE"] == spec.storage.artifacts
    assert all(k.startswith("OPTJOB_") for k in config["envs"])
    # A nonexistent local path is not mounted; mounts are only job.json and the wheel.
    assert not any("touch" in k or "touch" in v for k, v in config["file_mounts"].items())


def test_apply_under_a_hostile_optjob_home(tmp_path: Path, standin_cli: Cli):
    """OPTJOB_HOME (so every job folder) with spaces, quotes, `;`, `$(...)` and backticks:
    the launch shell quotes it, the job runs, and nothing in it is executed."""
    canary = tmp_path / "CANARY"
    home = tmp_path / f"h o'me\"; touch {canary}; $(touch {canary}2) `touch {canary}3`"
    cli = Cli(home, {**standin_cli.env, "OPTJOB_HOME": str(home), "STANDIN_STEPS": "3"})
    spec = tmp_path / "s.yaml"
    spec.write_text(standin_spec())
    proc = cli.run("apply", str(spec), "--local", "--yes", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
    assert (home / "jobs" / "tiny" / "logs" / "attempt-1.exit").read_text().strip() == "0"
    assert not any(tmp_path.glob("CANARY*"))


@pytest.mark.parametrize("command", ["status", "logs", "down", "report", "cost"])
def test_hostile_job_names_on_the_command_line(tmp_path: Path, standin_cli: Cli, command: str):
    before = set(tmp_path.rglob("*"))
    for name in ("../../etc", "; rm -rf ~", "$(touch CANARY)", "a/b"):
        proc = standin_cli.run(command, name)
        assert proc.returncode == 2 and "no job named" in proc.stderr, proc.stderr
    home = standin_cli.home
    created = {p for p in set(tmp_path.rglob("*")) - before if p != home and home not in p.parents}
    assert not created and not any(tmp_path.rglob("CANARY"))

