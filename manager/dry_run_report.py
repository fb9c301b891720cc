"""What ``apply --dry-run`` verified, and what it could not verify and why: one line each.

A dry run runs the spec's pipeline on a tiny stand-in model on this machine, offline. That proves
the spec, the plan and every step's code path; it cannot prove what only the real run touches. So
the dry run ends with two lists and a verdict that counts the second: ``dry run passed`` when there
is nothing it could not verify, ``dry run passed with N things not verified`` otherwise (both exit
0: a dry run cannot fail for what it was never able to check; the lines say what to check by hand).

What is checked here is cheap and offline-safe: the hub id's local cache (files only), a local model
folder, credentials for the chosen cloud and for the bucket (environment variables and files only,
``local_credentials``), and the bucket itself with one read under a short timeout, only where
credentials were found. What the workload did comes from its events: the stand-in it ran on and each
output loaded back (``check`` events, ``steps.dry_run_checks``), the steps done, the checkpoints."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .local_credentials import SCHEME_CLOUD, bucket_credentials, cloud_credentials
from .units import money

if TYPE_CHECKING:
    from optjob.specs import JobSpec

    from .plan import Plan

#: The bucket probe's bound (one read of a key that need not exist).
PROBE_TIMEOUT_S = 5.0
TRAINING_KINDS = ("train", "distill", "hpo")


@dataclass
class DryRunReport:
    verified: list[str] = field(default_factory=list)
    #: "what: why" lines.
    not_verified: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        n = len(self.not_verified)
        return "dry run passed" if n == 0 else f"dry run passed with {n} thing{'s' if n != 1 else ''} not verified"

    def lines(self) -> list[str]:
        out = ["dry run verified:", *(f"  ok  {v}" for v in self.verified)]
        if self.not_verified:
            out += ["dry run could not verify:", *(f"  --  {v}" for v in self.not_verified)]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.verified, "not_verified": self.not_verified, "verdict": self.verdict()}


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (its documented variables)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def cached_file(repo: str, filename: str, kind: str = "models", cache: Path | None = None) -> Path | None:
    """``filename`` of hub repo ``repo`` in the local cache (any snapshot), or None. Files only."""
    folder = (cache or hub_cache()) / f"{kind}--{repo.replace('/', '--')}" / "snapshots"
    try:
        return next((p for p in sorted(folder.glob(f"*/{filename}")) if p.is_file()), None)
    except OSError:
        return None


def probe_bucket(url: str, endpoint_url: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the bucket answered one read (of a key that need not exist) within ``timeout_s``;
    else why not. The read runs in a daemon thread, so an SDK that hangs cannot hold the dry run."""
    outcome: dict[str, str] = {}

    def read() -> None:
        try:
            from optjob.steps.storage import open_storage

            open_storage(url, endpoint_url=endpoint_url, attempts=1).get_bytes(".optjob-dry-run-probe")
        except Exception as exc:
            outcome["error"] = " ".join(str(exc).split())[:200] or type(exc).__name__
        else:
            outcome["ok"] = "yes"

    thread = threading.Thread(target=read, daemon=True, name="optjob-bucket-probe")
    thread.start()
    thread.join(timeout_s)
    if "ok" in outcome:
        return None
    return outcome.get("error") or f"no answer within {timeout_s:g} s"


def build(spec: JobSpec, spec_path: str | None, cloud_plan: Plan | None, events: list[dict[str, Any]], *,
          kills: int = 0, kills_done: int = 0, env: Mapping[str, str] | None = None, home: Path | None = None,
          probe: Callable[[str, str | None], str | None] = probe_bucket,
          earlier: list[dict[str, Any]] | None = None) -> DryRunReport:
    """The report of a dry run of ``spec`` that succeeded: ``events`` are its run's (the workload's),
    ``earlier`` those of the dry run's earlier runs (where the steps it reused were checked),
    ``kills``/``kills_done`` the preemptions rehearsed (asked / survived)."""
    r = DryRunReport()
    r.verified.append(f"spec valid ({spec_path})" if spec_path else "spec valid")
    _plan(r, spec, cloud_plan)
    _ran(r, spec, events, kills, kills_done, earlier or [])
    _model(r, spec, spec_path, events)
    _data(r, spec)
    chosen = cloud_plan.chosen if cloud_plan is not None else None
    cloud = chosen.cloud if chosen is not None else spec.resources.cloud
    _storage(r, spec, cloud, env, home, probe)
    _cloud(r, spec, cloud, env, home)
    _hardware(r, spec)
    return r


def _plan(r: DryRunReport, spec: JobSpec, plan: Plan | None) -> None:
    if plan is None:
        r.verified.append("plan made")
        return
    c = plan.chosen
    if c is None:
        r.not_verified.append(f"plan: not priced ({plan.budget.reason or 'no offer matches resources'}); "
                              "`optjob apply` without --dry-run would refuse it")
        return
    where = "this machine" if c.cloud == "local" else \
        f"{c.cloud} {c.accelerators or 'CPU'}{' spot' if c.spot else ''}"
    r.verified.append(f"plan priced: {where}, {c.est_hours:.2f} h, {money(c.est_usd)} for the full spec")
    if not plan.budget.fits:
        r.not_verified.append(f"budget: the plan does not fit it ({plan.budget.reason or 'over budget'}); "
                              "`optjob apply` without --dry-run would refuse it")


def _ran(r: DryRunReport, spec: JobSpec, events: list[dict[str, Any]], kills: int, kills_done: int,
         earlier: list[dict[str, Any]]) -> None:
    dones = [e for e in events if e.get("event") == "step_done" and isinstance(e.get("index"), int)]
    # a compare variant's steps share the compare step's index: (index, variant, its place, kind) tells them apart
    done = sorted({(e["index"], e.get("variant") or "", e.get("variant_step") or 0, e.get("kind")) for e in dones})
    reused = {(e["index"], e.get("variant")) for e in dones if e.get("skipped")}
    total = len(spec.pipeline) + sum(len(steps) for steps in spec.variants.values())
    stand_in = next((e for e in reversed(events) if e.get("event") == "check" and e.get("what") == "stand_in"), None)
    model = (stand_in or {}).get("model") or {}
    tiny = (f"a tiny {model.get('family')} model ({model.get('layers')} layers, {model.get('hidden')} wide)"
            if model else "a tiny model")
    steps = ", ".join(f"{i}:{k}" + (f" ({v})" if v else "") for i, v, _, k in done)
    r.verified.append(f"{len(done)} of {total} steps ran on a stand-in, {tiny}, a slice of the data "
                      f"and a few optimizer steps: {steps or 'none'}"
                      + (f" ({len(reused)} reused from an earlier dry run of this spec)" if reused else ""))
    reloads = [e for e in events if e.get("event") == "check" and e.get("what") == "reload" and e.get("ok")]
    reloads += [e for e in earlier if e.get("event") == "check" and e.get("what") == "reload" and e.get("ok")
                and (e.get("index"), e.get("variant")) in reused]
    if reloads:
        folders = len({(e.get("index"), e.get("variant"), e.get("variant_step")) for e in reloads})
        r.verified.append(f"every step's output reloads with AutoModelForCausalLM.from_pretrained "
                          f"({folders} folder{'s' if folders != 1 else ''})")
    for e in events:  # what a step itself left to the real run (evaluate: lm-eval registry tasks)
        if e.get("event") == "check" and e.get("skipped") and e.get("what") not in ("stand_in", "reload"):
            skipped = ", ".join(map(str, e["skipped"])) if isinstance(e["skipped"], list) else str(e["skipped"])
            where = f"steps[{e['index']}] {e.get('kind')}: " if isinstance(e.get("index"), int) else ""
            r.not_verified.append(f"{where}{e.get('what')} {skipped}: {e.get('detail') or 'not run by a dry run'}")
    checkpoints = sum(e.get("event") == "checkpoint" for e in events)
    if checkpoints:
        r.verified.append(f"checkpoints written ({checkpoints})")
    trains = any(k in TRAINING_KINDS for *_, k in done) or any(s.kind in TRAINING_KINDS for s in spec.pipeline)
    if kills_done:
        r.verified.append(f"resume from a checkpoint rehearsed ({kills_done} kill{'s' if kills_done != 1 else ''} "
                          "survived)")
    elif trains:
        r.not_verified.append("resume after a preemption: " + (
            "no kill happened (the pipeline ended before the kill point, or its steps were reused)" if kills
            else "no preemption was rehearsed; add --simulate-preemption 1"))


def _model(r: DryRunReport, spec: JobSpec, spec_path: str | None, events: list[dict[str, Any]]) -> None:
    m = spec.model
    if m.hf is not None:
        config = cached_file(m.hf, "config.json")
        if config is not None:
            r.verified.append(f"hub model {m.hf}: config in the local cache ({config.parent.parent.parent.name}); "
                              "its weights were not loaded")
        else:
            stand_in = next((e for e in events if e.get("event") == "check" and e.get("what") == "stand_in"), {})
            family = (stand_in.get("model") or {}).get("family")
            r.not_verified.append(f"hub model {m.hf}: not in the local Hugging Face cache ({hub_cache()}) and not "
                                  "looked up by the dry run; a tiny model stood in"
                                  + (f" ({family}: its family, or a guess)" if family else ""))
    elif m.path is not None:
        folder = Path(m.path).expanduser()
        if not folder.is_absolute() and spec_path:
            folder = Path(spec_path).parent / folder
        if (folder / "config.json").is_file():
            r.verified.append(f"model folder {folder}: config.json readable; its weights were not loaded")
        else:
            r.not_verified.append(f"model folder {folder}: no config.json here (it must exist where the job runs)")
    tok = m.tokenizer
    hub_tokenizer = tok not in ("builtin", m.hf) and "/" in tok and not Path(tok).expanduser().exists()
    if hub_tokenizer and not any(cached_file(tok, f) for f in ("tokenizer_config.json", "tokenizer.json")):
        r.not_verified.append(f"tokenizer {tok}: not in the local Hugging Face cache and not looked up online; "
                              "the builtin tokenizer stood in")


def _data(r: DryRunReport, spec: JobSpec) -> None:
    for source in (spec.data.source, spec.data.eval_source):
        if source and source.startswith("hf:"):
            repo = "/".join(source[3:].split("/")[:2])
            cached = (hub_cache() / f"datasets--{repo.replace('/', '--')}").is_dir()
            where = "in the local Hugging Face cache, not read" if cached else "not fetched (a dry run stays offline)"
            r.not_verified.append(f"data {source}: {where}; builtin:python-docs stood in")
    for i, step in enumerate(spec.pipeline):
        for task in getattr(step, "tasks", None) or []:
            if not task.lower().endswith((".yaml", ".yml")):
                r.not_verified.append(f"steps[{i}] lm-eval task {task}: its dataset downloads from the Hugging Face "
                                      "Hub on the node (it needs the network there); not run by a dry run")


def _storage(r: DryRunReport, spec: JobSpec, cloud: str, env: Mapping[str, str] | None, home: Path | None,
             probe: Callable[[str, str | None], str | None]) -> None:
    url = spec.storage.artifacts
    if not url:
        return
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is None:
        folder = Path(url).expanduser()
        parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if parent is not None and os.access(parent, os.W_OK):
            r.verified.append(f"storage folder {folder}: writable here (the dry run itself does not use it)")
        else:
            r.not_verified.append(f"storage folder {folder}: not writable from here")
        return
    found = bucket_credentials(scheme, env, home)
    if found is None:
        r.not_verified.append(f"bucket {url}: not checked, no {SCHEME_CLOUD.get(scheme, scheme)} credentials found "
                              "here (environment or the SDK's files)")
        return
    why = probe(url, spec.storage.endpoint_url)
    if why is None:
        r.verified.append(f"bucket {url}: answered a read (credentials from {found}); the dry run wrote nothing there")
    else:
        r.not_verified.append(f"bucket {url}: not reachable from here with the credentials from {found}: {why}")


def _cloud(r: DryRunReport, spec: JobSpec, cloud: str, env: Mapping[str, str] | None, home: Path | None) -> None:
    if cloud == "local":
        return
    found = cloud_credentials(cloud, env, home)
    if found is None:
        r.not_verified.append(f"{cloud} credentials: none found here (environment or the CLI's files); "
                              "`sky check` tests them")
    else:
        r.verified.append(f"{cloud} credentials present ({found}); not tried (`sky check` tests them)")
    r.not_verified.append("the node's setup (the pinned environment installed on a fresh node"
                          + (f", image {spec.resources.image}" if spec.resources.image else "")
                          + "): not run here")


def _hardware(r: DryRunReport, spec: JobSpec) -> None:
    for i, step in enumerate(spec.pipeline):
        adapter = getattr(step, "adapter", None)
        if getattr(adapter, "method", None) == "qlora":
            r.not_verified.append(f"steps[{i}] {step.kind}: QLoRA's 4-bit loading needs a CUDA GPU; rehearsed as LoRA")
        if getattr(step, "method", None) == "int4-weight":
            r.not_verified.append(f"steps[{i}] {step.kind}: int4-weight needs a CUDA GPU; not run on this CPU")
    res = spec.resources
    gpus = max((c for _, c in res.accelerator_choices), default=1) if res.cloud != "local" else 1
    if res.nodes > 1 or gpus > 1:
        r.not_verified.append(f"training across {res.nodes} node(s) x {gpus} GPU(s) (DDP): the dry run is one process")
