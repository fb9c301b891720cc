"""The plan prices one-shot methods' calibration pass (Wanda, SparseGPT, GPTQ): a forward over the
calibration windows, layer by layer (and SparseGPT/GPTQ's Hessians). It used to price none of it:
a GPTQ step on 128 windows of 2048 tokens cost only its automatic evaluation."""

from __future__ import annotations

import pytest
from optjob.manager.pricing.estimate import CALIBRATION_FLOPS_PER_PARAM, workload
from optjob.specs import loads_spec


def _work(step: str) -> tuple[int, float, int]:
    """(tokens, FLOPs) of the step, less those of a magnitude prune (the automatic evaluation alone)."""
    body = """name: t
model: {init: {family: llama, layers: 2, hidden: 128, heads: 4, vocab: 2048}}
data: {source: builtin:python-docs, seq_len: 64}
steps: [%s]
"""
    [w], n, _ = workload(loads_spec(body % step))
    [base], _, _ = workload(loads_spec(body % "prune: {sparsity: 0.5}"))
    return w.tokens - base.tokens, w.flops - base.flops, n


@pytest.mark.parametrize(("step", "method"), [
    ("prune: {method: wanda, calibration: {samples: 16}}", "wanda"),
    ("prune: {method: sparsegpt, calibration: {samples: 16}}", "sparsegpt"),
    ("quantize: {method: gptq, calibration: {samples: 16}}", "gptq"),
])
def test_calibration_windows_are_priced(step: str, method: str) -> None:
    tokens, flops, n = _work(step)
    assert tokens == 16 * 64  # data.seq_len unless calibration.seq_len says otherwise
    assert flops == pytest.approx(CALIBRATION_FLOPS_PER_PARAM[method] * n * 16 * 64)


def test_calibration_seq_len_and_methods_without_calibration() -> None:
    assert _work("quantize: {method: gptq, calibration: {samples: 8, seq_len: 256}}")[0] == 8 * 256
    for step in ("quantize: {method: rtn}", "quantize: {method: int8-dynamic}",
                 "prune: {method: magnitude}"):
        assert _work(step)[:2] == (0, 0.0)
