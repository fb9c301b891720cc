"""Estimator arithmetic on hand-computed inputs, the total-cost choice, and calibration."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
from optjob.manager.meter import stop_margin_s
from optjob.manager.pricing.calibration import RunRecord, calibrated_efficiency
from optjob.manager.pricing.estimate import DECODE_S_PER_TOKEN, PROVISION_S, estimate, plan_offers, workload
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
    total_s = step_s + OVERHEAD_ONDEMAND
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
        ("quantize", auto, 2 * n3 * auto, AUTO_FLOOR_S),
        ("evaluate", 3 * 8 * 64 + 5 * 32, 2 * n3 * 1_696, AUTO_FLOOR_S),  # capped eval split + latency tokens
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
