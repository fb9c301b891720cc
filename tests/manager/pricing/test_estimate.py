"""Estimator arithmetic on hand-computed inputs, the total-cost choice, and calibration."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from optjob.manager.meter import stop_margin_s
from optjob.manager.pricing.calibration import RunRecord, calibrated_efficiency
from optjob.manager.pricing.estimate import (
    DECODE_S_PER_TOKEN,
    INT8_DYNAMIC_DECODE_FACTOR,
    PROVISION_S,
    estimate,
    plan_offers,
    workload,
)
from optjob.manager.pricing.offers import Offer, choose, find_offers
from optjob.specs import loads_spec
from optjob.specs.job import JobSpec
from optjob.specs.model import ModelInit

A100 = Offer("aws", "us-east-1", None, "x.a100", "A100:1", "A100", 1, False, 4.0, 12, 85)
#: Provisioning + setup + the stop reserve (a checkpoint write and SkyPilot's teardown margin).
RESERVE = stop_margin_s("skypilot", None)
OVERHEAD_ONDEMAND = 180 + 120 + RESERVE
OVERHEAD_SPOT = 300 + 120 + RESERVE
#: The automatic evaluation after a step (the runner's default): the eval split of the builtin
#: corpus at seq 128 (5% of 1.8M chars at 4 chars a token) and 5 x 32 generated tokens.
AUTO_TOKENS = int(1_800_000 / 4 * 0.05) + 5 * 32
AUTO_FLOOR_S = 5 * 32 * DECODE_S_PER_TOKEN


def _spec(body: str) -> JobSpec:
    return loads_spec("name: t\n" + body)


SMALL = """
model: {path: ./m, params: 1000000}
data: {source: builtin:python-docs, seq_len: 128}
steps:
  - train: {max_steps: 100, batch_size: 8, precision: bf16}
resources: {cloud: aws, accelerators: A100:1}
"""


def test_arithmetic_on_known_inputs() -> None:
    est = estimate(_spec(SMALL), A100, efficiency=0.5)
    tokens = 100 * 8 * 128
    flops = 6 * 1_000_000 * tokens + 2 * 1_000_000 * AUTO_TOKENS
    step_s = flops / (312e12 * 0.5) + 5 + AUTO_FLOOR_S
    assert tokens == 102_400
    [(index, kind, got_tokens, got_flops, got_s)] = est.steps
    assert (index, kind, got_tokens) == (0, "train", tokens + AUTO_TOKENS)
    assert got_flops == pytest.approx(flops) and got_s == pytest.approx(step_s)
    # No storage: the job folder is copied home, so the cluster keeps its 10 autostop minutes (not 1) and
    # the stop reserve is what it takes to be gone with no manager alive: 10 min + skylet check + termination.
    reserve = stop_margin_s("skypilot", None, _spec(SMALL))
    assert reserve == pytest.approx(RESERVE - 180 + 10 * 60 + 60 + 150)
    total_s = step_s + 180 + 120 + reserve
    assert est.total_hours == pytest.approx(total_s / 3600)
    assert est.total_usd == pytest.approx(total_s / 3600 * 4.0)
    assert est.ondemand_usd == pytest.approx(est.total_usd)
    assert (est.efficiency, est.calibrated_runs, est.params, est.notes) == (0.5, 0, 1_000_000, [])


def test_spot_nodes_and_on_demand_fallback() -> None:
    body = SMALL.replace("A100:1}", "A100:1, nodes: 2, spot: true}")
    spec = _spec(body + "storage: {artifacts: s3://my-bucket/p}\n")
    spot = replace(A100, spot=True, hourly_usd=1.0, ondemand_hourly_usd=4.0)
    est = estimate(spec, spot, efficiency=0.5)
    step_s = (6e6 * 102_400 + 2e6 * AUTO_TOKENS) / (312e12 * 0.5 * 2) + 5 + AUTO_FLOOR_S
    assert est.total_hours == pytest.approx((step_s + OVERHEAD_SPOT) / 3600)
    assert est.total_usd == pytest.approx((step_s + OVERHEAD_SPOT) / 3600 * 1.0 * 2)
    assert est.ondemand_usd == pytest.approx((step_s + OVERHEAD_ONDEMAND) / 3600 * 4.0 * 2)


def test_fp32_uses_the_fp32_peak() -> None:
    est = estimate(_spec(SMALL.replace("precision: bf16", "precision: fp32")), A100, efficiency=0.5)
    assert est.steps[0].seconds == pytest.approx((6e6 * 102_400 + 2e6 * AUTO_TOKENS) / (19.5e12 * 0.5) + 5
                                                 + AUTO_FLOOR_S)


PIPELINE = """
model:
  init: {family: llama, layers: 4, hidden: 256, heads: 4, intermediate: 768, vocab: 4096}
data: {source: builtin:python-docs, seq_len: 64, eval_fraction: 0.05}
steps:
  - hpo: {trials: 3, trial_steps: 10, space: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}
  - train: {max_steps: 20, batch_size: 4, grad_accum: 2, eval_every: 10, eval_batches: 2}
  - prune: {method: structured, mlp_fraction: 0.5, recover_steps: 5, batch_size: 4}
  - distill: {max_steps: 10, batch_size: 4, student: {layers: 2}}
  - quantize: {method: int8-dynamic}
  - evaluate: {max_batches: 3, batch_size: 8}
resources: {cloud: local, hourly_usd: 0.1}
"""


def test_every_step_kind_and_the_shrinking_model() -> None:
    base = ModelInit(family="llama", layers=4, hidden=256, heads=4, intermediate=768, vocab=4096)
    n1 = base.approx_params()
    n2 = base.model_copy(update={"intermediate": 384}).approx_params()
    n3 = base.model_copy(update={"intermediate": 384, "layers": 2}).approx_params()
    assert n1 > n2 > n3
    auto = int(1_800_000 / 4 * 0.05) + 5 * 32  # the automatic evaluation after a step, at seq 64
    want = [
        ("hpo", 3 * 10 * 4 * 2 * 64, 6 * n1 * 15_360, 0.0),  # trials are scored inside the search
        ("train", 10_240 + 1_024 + auto, 6 * n1 * 10_240 + 2 * n1 * (1_024 + auto), AUTO_FLOOR_S),
        ("prune", 5 * 4 * 64 + auto, 6 * n2 * 1_280 + 2 * n2 * auto, AUTO_FLOOR_S),
        ("distill", 10 * 4 * 64 + auto, (2 * n2 + 6 * n3) * 2_560 + 2 * n3 * auto, AUTO_FLOOR_S),
        # int8-dynamic decodes ~3x slower than fp32 on CPU: every evaluation after it pays that per token
        ("quantize", auto, 2 * n3 * auto, AUTO_FLOOR_S * INT8_DYNAMIC_DECODE_FACTOR),
        ("evaluate", 3 * 8 * 64 + 5 * 32, 2 * n3 * 1_696, AUTO_FLOOR_S * INT8_DYNAMIC_DECODE_FACTOR),
    ]
    spec = _spec(PIPELINE)
    work, params, notes = workload(spec)
    assert params == n1 and notes == []
    expected = [(k, t, pytest.approx(f)) for k, t, f, _ in want]
    assert [(w.kind, w.tokens, w.flops) for w in work] == expected
    [local] = find_offers(spec.resources)
    est = estimate(spec, local, efficiency=0.25)
    for step, (_, _, f, floor) in zip(est.steps, want, strict=True):
        # CPU: 0.5 TFLOP/s; 0.5 s fixed locally; generated tokens at least DECODE_S_PER_TOKEN each
        assert step.seconds == pytest.approx(f / (0.5e12 * 0.25) + 0.5 + floor)
    overhead = PROVISION_S["local"] + stop_margin_s("local", None)  # start-up and the stop reserve
    assert est.overhead_seconds == pytest.approx(overhead)  # no provisioning, no download
    total = sum(s.seconds for s in est.steps) + overhead
    assert est.total_usd == pytest.approx(total / 3600 * 0.1)


def test_eval_split_of_the_builtin_corpus() -> None:
    spec = _spec("""
model: {init: {layers: 1, hidden: 64, heads: 1, vocab: 256}}
steps: [{evaluate: {metrics: [perplexity]}}]
""")
    [w] = workload(spec)[0]
    assert w.tokens == int(1_800_000 / 4 * 0.05)


def test_param_counts_of_hub_models_and_guesses() -> None:
    known = estimate(_spec("model: {hf: Qwen/Qwen2.5-0.5B}\nsteps: [train: {}]\n"), A100)
    assert known.params == 494_000_000 and known.notes == []
    assert known.overhead_seconds == pytest.approx(OVERHEAD_ONDEMAND + 494e6 * 2 / 200e6)
    body = "model: {hf: someone/mystery}\ndata: {source: hf:x/y}\nsteps: [train: {}]\n"
    unknown = estimate(_spec(body), A100)
    assert unknown.params == 1_000_000_000
    assert any("assumed 1B" in n for n in unknown.notes)
    assert any("10M tokens" in n for n in unknown.notes)


BIG = """
model: {path: ./m, params: 1000000000}
data: {seq_len: 1024}
steps:
  - train: {max_steps: 5000, batch_size: 8, precision: bf16}
resources: {cloud: any, accelerators: [T4:1, H100:1]}
"""
T4 = Offer("gcp", "us-central1", None, "slow", "T4:1", "T4", 1, False, 0.50, 4, 16)
H100 = Offer("gcp", "us-central1", None, "fast", "H100:1", "H100", 1, False, 2.00, 26, 234)


def test_choice_is_the_cheapest_total_not_the_cheapest_hour() -> None:
    spec = _spec(BIG)
    offers = sorted([H100, T4], key=lambda o: o.hourly_usd)
    assert offers[0] is T4
    estimates, choice = plan_offers(spec, offers)
    slow, fast = estimates
    assert fast.total_usd < slow.total_usd and fast.total_hours < slow.total_hours
    assert choice.chosen is H100 and choice.fits and choice.over_by_usd == 0.0
    assert choice.estimate is fast


def test_budget_over_and_hours() -> None:
    spec = _spec(BIG + "budget: {max_usd: 0.10}\n")
    estimates, choice = plan_offers(spec, [T4, H100])
    assert choice.chosen is H100 and not choice.fits
    assert choice.over_by_usd == pytest.approx(estimates[1].total_usd - 0.10)
    assert "exceeds" in choice.reason
    # the faster offer is dearer per hour, but only it finishes in time
    slow_spec = _spec(BIG + "budget: {max_hours: 1}\n")
    t4_dear = replace(T4, hourly_usd=0.01)
    ests = [estimate(slow_spec, o) for o in (t4_dear, H100)]
    assert ests[0].total_usd < ests[1].total_usd and ests[0].total_hours > 1
    assert choose(slow_spec, [t4_dear, H100], ests).chosen is H100
    never = _spec(BIG + "budget: {max_hours: 0.01}\n")
    ests = [estimate(never, o) for o in (T4, H100)]
    none = choose(never, [T4, H100], ests)
    assert none.chosen is None and not none.fits and "fastest" in none.reason
    assert choose(never, [], []).chosen is None
    with pytest.raises(ValueError):
        choose(never, [T4], [])


def _tps(eff: float, params: int, peak_tflops: float, devices: int = 1) -> float:
    return eff * peak_tflops * 1e12 * devices / (6 * params)


def test_calibration_median_within_the_size_bucket() -> None:
    n = 1_000_000
    records = [
        (n, "A100", _tps(0.2, n, 312), "bf16"),
        RunRecord(int(1.5 * n), "a100", _tps(0.3, int(1.5 * n), 312), "bf16"),
        {"model_params": n, "accelerator": "A100", "tokens_per_s": _tps(0.4, n, 19.5),
         "precision": "fp32"},
        (5 * n, "A100", _tps(0.9, 5 * n, 312), "bf16"),  # 5x bigger model: another bucket
        (n, "H100", _tps(0.9, n, 989), "bf16"),  # another accelerator
        (n, "A100", 0.0, "bf16"),  # not a measurement
    ]
    eff, runs = calibrated_efficiency(records, n, "A100") or (0, 0)
    assert (eff, runs) == (pytest.approx(0.3), 3)
    eight = [*records, (n, "A100:8", _tps(0.25, n, 312, 8), "bf16")]
    assert calibrated_efficiency(eight, n, "A100") == (pytest.approx(0.275), 4)
    assert calibrated_efficiency(records, n, "cpu") is None
    cpu = [(n, "cpu", _tps(0.1, n, 0.5), "fp32")]
    assert calibrated_efficiency(cpu, n, "cpu") == (pytest.approx(0.1), 1)
    est = estimate(_spec(SMALL), A100, calibration=records)
    assert (est.efficiency, est.calibrated_runs) == (pytest.approx(0.3), 3)
    assert est.steps[0].seconds == pytest.approx((6e6 * 102_400 + 2e6 * AUTO_TOKENS) / (312e12 * 0.3) + 5
                                                 + AUTO_FLOOR_S)
    assert any("calibrated" in note for note in est.notes)


def test_calibration_reads_state_store_rows() -> None:
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.execute("CREATE TABLE calibration (ts REAL, job_name TEXT, accelerator TEXT, "
               "model_params INTEGER, precision TEXT, tokens_per_s REAL)")
    for eff in (0.1, 0.2, 0.6):
        db.execute("INSERT INTO calibration VALUES (0, 'j', 'L4', ?, 'bf16', ?)",
                   (2_000_000, _tps(eff, 2_000_000, 121)))
    rows = list(db.execute("SELECT * FROM calibration"))
    assert calibrated_efficiency(rows, 1_500_000, "L4") == (pytest.approx(0.2), 3)


def test_an_adapter_run_costs_4n_plus_6_per_adapter_weight() -> None:
    from optjob.manager.pricing.estimate import adapter_share, train_flops_per_param
    from optjob.specs import TrainStep

    full, lora = TrainStep(), TrainStep.model_validate({"adapter": {"r": 8}})
    assert train_flops_per_param(full) == 6.0 and train_flops_per_param(full, 0.5) == 6.0
    assert train_flops_per_param(lora, 0.01) == pytest.approx(4.0 + 6 * 0.01)
    gc = lora.model_copy(update={"gradient_checkpointing": True})
    assert train_flops_per_param(gc, 0.01) == pytest.approx(4.0 + 6 * 0.01 + 2 * 1.01)
    spec = _spec(LORA_RUN.format(steps="train: {adapter: {r: 8}}"))
    share = adapter_share(spec.pipeline[0], spec.model)
    assert 0.01 < share < 0.5  # r 8 on every Linear of a 64-wide model
    [work] = [w for w in workload(spec)[0] if w.kind == "train"]
    n = spec.model.init.approx_params() if spec.model.init else 0
    assert work.flops > (4.0 + 6 * share) * n * 20 * 8 * 32  # the train tokens, plus the evaluations


LORA_RUN = """
model: {{init: {{layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}}}
data: {{source: builtin:python-docs, seq_len: 32}}
steps:
  - {steps}
resources: {{cloud: local}}
"""


def test_calibration_from_a_lora_run_predicts_a_full_run_and_itself(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA run's tokens/s is measured at ~4N + 6N_adapter FLOPs a token, a full run's at 6N: the
    efficiency a LoRA run calibrates must predict the LoRA run at its own throughput, and a full run
    at that FLOP rate (4 + 6 x share) / 6 as fast; not as if the LoRA run had done 6N a token."""
    from optjob.manager.planner import make_plan
    from optjob.manager.pricing.accelerators import node_peak_flops
    from optjob.manager.pricing.calibration import tokens_per_second
    from optjob.manager.pricing.calibration_store import record_calibration
    from optjob.manager.pricing.estimate import adapter_share, train_flops_per_param
    from optjob.manager.store import Store

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    lora = _spec(LORA_RUN.format(steps="train: {max_steps: 20, adapter: {r: 8}}"))
    full = _spec(LORA_RUN.format(steps="train: {max_steps: 20}"))
    store = Store(tmp_path / "state.db")
    plan = make_plan(lora, local=True)
    store.claim_job("lora", provider="local", job_dir=str(tmp_path / "j"), spec_path=None,
                    spec_json=lora.model_dump_json(), plan_json=plan.dumps(), owner_alive=lambda job: False)
    measured = 5000.0  # tokens/s the LoRA run reported
    store.add_events("lora", 1, [{"event": "progress", "kind": "train", "index": 0, "step": s,
                                  "tokens_per_s": measured} for s in (2, 3, 4)])  # fmt: skip
    assert record_calibration(store, "lora", plan) == 1
    rows = store.calibration()
    n = lora.model.init.approx_params() if lora.model.init else 0
    per_lora = train_flops_per_param(lora.pipeline[0], adapter_share(lora.pipeline[0], lora.model))
    assert per_lora < 5.0
    assert len(rows) == 1
    est_lora, est_full = (estimate(s, find_offers(s.resources)[0], calibration=rows) for s in (lora, full))
    assert est_lora.calibrated_runs == est_full.calibrated_runs == 1
    eff = est_full.efficiency
    assert eff == pytest.approx(measured * per_lora * n / node_peak_flops(None, 1, "fp32"))
    assert tokens_per_second(n, "cpu", eff, "fp32", flops_per_param=per_lora) == pytest.approx(measured)
    assert tokens_per_second(n, "cpu", eff, "fp32") == pytest.approx(measured * per_lora / 6)
    # The estimates: the LoRA step's training takes its tokens at the measured rate.
    train_tokens = 20 * 8 * 32
    lora_s, full_s = (e.steps[0].seconds for e in (est_lora, est_full))
    assert full_s - lora_s == pytest.approx(train_tokens / (measured * per_lora / 6) - train_tokens / measured)
    # And the other way: a full run measured at 3000 tokens/s predicts the LoRA run 6 / (4 + 6 x share) as fast.
    store.claim_job("full", provider="local", job_dir=str(tmp_path / "f"), spec_path=None,
                    spec_json=full.model_dump_json(), plan_json=plan.dumps(), owner_alive=lambda job: False)
    store.add_events("full", 1, [{"event": "progress", "kind": "train", "index": 0, "step": 2, "tokens_per_s": 3000.0}])
    assert record_calibration(store, "full", plan) == 1
    from_full = [r for r in store.calibration() if r["job_name"] == "full"]
    eff = estimate(lora, find_offers(lora.resources)[0], calibration=from_full).efficiency
    assert tokens_per_second(n, "cpu", eff, "fp32") == pytest.approx(3000.0)
    assert tokens_per_second(n, "cpu", eff, "fp32", flops_per_param=per_lora) == pytest.approx(3000.0 * 6 / per_lora)
    store.close()


def test_a_checkpoint_precision_run_is_recorded_under_the_dtype_it_ran_in(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision: checkpoint`` on an fp32 model (``model.init``) ran in fp32: its calibration row says
    fp32, so a later fp32 plan finds it (the raw word "checkpoint" matched no plan)."""
    from optjob.manager.planner import make_plan
    from optjob.manager.pricing.calibration_store import record_calibration
    from optjob.manager.store import Store

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    spec = _spec(LORA_RUN.format(steps="train: {max_steps: 20, precision: checkpoint}"))
    store = Store(tmp_path / "state.db")
    plan = make_plan(spec, local=True)
    store.claim_job("ck", provider="local", job_dir=str(tmp_path / "j"), spec_path=None,
                    spec_json=spec.model_dump_json(), plan_json=plan.dumps(), owner_alive=lambda job: False)
    store.add_events("ck", 1, [{"event": "progress", "kind": "train", "index": 0, "step": 2, "tokens_per_s": 900.0}])
    assert record_calibration(store, "ck", plan) == 1
    assert [r["precision"] for r in store.calibration()] == ["fp32"]
    store.close()


def test_a_train_step_inside_a_compare_variant_calibrates_instead_of_crashing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant's progress events carry ``variant`` and ``variant_step``; the calibration looked the
    step up in the trunk pipeline by index and raised IndexError, crashing apply at its end."""
    from optjob.manager.planner import make_plan
    from optjob.manager.pricing.calibration_store import record_calibration
    from optjob.manager.store import Store

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    spec = _spec(LORA_RUN.format(steps="train: {max_steps: 4}\n  - compare: {more: [{train: {max_steps: 4}}], "
                                 "q: [{quantize: {method: fp16}}]}"))
    store = Store(tmp_path / "state.db")
    plan = make_plan(spec, local=True)
    store.claim_job("cmp", provider="local", job_dir=str(tmp_path / "j"), spec_path=None,
                    spec_json=spec.model_dump_json(), plan_json=plan.dumps(), owner_alive=lambda job: False)
    store.add_events("cmp", 1, [
        {"event": "progress", "kind": "train", "index": 0, "step": 2, "tokens_per_s": 900.0},
        {"event": "progress", "kind": "train", "index": 1, "variant": "more", "variant_step": 0, "step": 2,
         "tokens_per_s": 800.0},
        {"event": "progress", "kind": "train", "index": 1, "variant": "gone", "variant_step": 0, "step": 2,
         "tokens_per_s": 700.0},
    ])  # fmt: skip
    assert record_calibration(store, "cmp", plan) == 2
    store.close()
