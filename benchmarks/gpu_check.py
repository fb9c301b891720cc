"""The prepared GPU check: every CUDA path optjob has, each in its own try block, one JSON object out.

    python -m benchmarks.gpu_check --out "$OUT"     # on the device machine (about 2-4 minutes on an H200)
    python -m benchmarks.gpu_check --cpu-smoke      # tiny models on the CPU: proves the script runs

Checks (``benchmarks/README.md`` says what each figure means): ``bf16_train`` (train_loop, bf16, loss
falls, tokens/s); ``trainer_throughput`` (optjob / transformers.Trainer tokens/s); ``memory_*`` (the
plan's memory estimate / ``torch.cuda.max_memory_allocated``: full fp32 and bf16, LoRA, gradient
checkpointing); ``qlora`` (bitsandbytes 4-bit base); ``quantize_*`` (int4-weight, gptq and rtn 4-bit:
the saved folder reloads with ``AutoModelForCausalLM.from_pretrained`` and its loss matches);
``ddp_nccl`` / ``fsdp_nccl`` (more than one GPU). Each record: ``status`` ok / failed / skipped,
``figure`` (``unit``), ``goal``, ``met``, ``error`` (the last line, when failed), ``reason`` (when
skipped), ``seconds``, ``metrics``. Written to ``--out``/gpu_check.json (default ``$OUT``) after every
check, so a run cut short still leaves what it did; printed to stdout at the end. Exit 0 when no
check failed, 1 otherwise.

optjob need not be installed: a bare checkout imports through links made on the fly
(``harness.ensure_optjob``); what cannot be imported is listed in ``environment.import_errors`` and
each check that needs it says so."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from .gpu import harness
from .gpu.bench import GPU, SMOKE
from .gpu.harness import Check

OUT_FILE = "gpu_check.json"


def checks(bench: Callable[[], Any]) -> list[Check]:
    """Every check, in the order they run; ``bench()`` gives the shared ``Bench`` (built once)."""
    from .gpu import distributed, memory, quantized, training

    def on(fn: Callable[..., None], *args: Any) -> Callable[[dict[str, Any]], None]:
        return lambda out: fn(bench(), out, *args)

    out = [
        Check("bf16_train", "train_loop, precision bf16: loss finite and decreasing; tokens/s",
              on(training.bf16_train)),
        Check("trainer_throughput", "optjob train_loop / transformers.Trainer tokens/s, bf16, same model and batch",
              on(training.trainer_throughput), timeout_s=300),
    ]
    for name, train in memory.CASES.items():
        out.append(Check(name, f"memory estimate / max_memory_allocated: {name.removeprefix('memory_')}",
                         on(memory.memory_case, train)))
    out.append(Check("qlora", "train step with adapter qlora (bitsandbytes 4-bit): loss, trainable params, peak",
                     on(memory.qlora)))
    for name in quantized.NAMES:
        out.append(Check(name, f"quantize {name.removeprefix('quantize_')}: saved folder reloads, same loss",
                         on(quantized.quantize_case, name)))
    for strategy in distributed.STRATEGIES:
        out.append(Check(f"{strategy}_nccl", f"{strategy} over NCCL on every GPU (torchrun, the workload)",
                         on(distributed.distributed_case, strategy), timeout_s=360))
    return out


class _Lazy:
    """The ``Bench``, built at the first check that needs it; a failure to build is re-raised for each."""

    def __init__(self) -> None:
        self.make: Callable[[], Any] | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        if self.error is not None:
            raise RuntimeError(f"setup failed: {harness.last_line(self.error)}")
        if self.value is None:
            assert self.make is not None
            try:
                self.value = self.make()
            except Exception as exc:
                self.error = exc
                raise
        return self.value


def _make_bench(smoke: bool, cache: Path, tmp: Path) -> Any:
    import torch

    from .gpu.bench import Bench

    if smoke:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and the cores are shared
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        raise RuntimeError("torch sees no CUDA device (use --cpu-smoke to run the script on the CPU)")
    started = time.perf_counter()
    bench = Bench(SMOKE if smoke else GPU, device, cache, tmp)
    print(f"setup (corpus, tokenizer): {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return bench


def _write(result: dict[str, Any], out_dir: Path | None) -> None:
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{OUT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out_dir / OUT_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help=f"folder for {OUT_FILE} (default: $OUT when set)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU; CUDA-only checks skipped")
    parser.add_argument("--cache", type=Path, default=None,
                        help="corpus/tokenizer cache (default: $OPTJOB_CACHE, else a folder under the scratch one)")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every check's time limit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, job folders)")
    args = parser.parse_args(argv)
    bench = _Lazy()
    todo = checks(bench)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in todo}
        if unknown:
            print(f"--only: no check named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        todo = [c for c in todo if c.name in wanted]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing outside the machine: fail fast, never hang
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = args.cache or (Path(os.environ["OPTJOB_CACHE"]) if os.environ.get("OPTJOB_CACHE") else tmp / "cache")
    bench.make = partial(_make_bench, args.cpu_smoke, cache, tmp)
    result: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "mode": "cpu-smoke" if args.cpu_smoke else "cuda",
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "sizes": asdict(SMOKE if args.cpu_smoke else GPU), "optjob": harness.ensure_optjob()}
    result.update(environment=harness.environment(), checks={})
    result["environment"]["seconds"] = round(time.perf_counter() - started, 1)

    def cleanup() -> None:
        if bench.value is not None:
            bench.value.cleanup()

    try:
        for check in todo:
            result["checks"][check.name] = harness.run_check(check, cleanup, timeout_scale=args.timeout_scale)
            result["summary"] = harness.summary(result["checks"])
            _write(result, args.out)
    finally:
        if args.keep:
            print(f"scratch folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["summary"] = harness.summary(result["checks"])
    _write(result, args.out)
    print(json.dumps(result, indent=1, default=str), flush=True)
    return 1 if result["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
