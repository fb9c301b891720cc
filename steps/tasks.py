"""Benchmark tasks (``evaluate: {tasks: [...]}``) through lm-evaluation-harness (the ``eval`` extra).

The model in memory is handed to lm-eval's ``HFLM`` with its tokenizer (no hub download, nothing
saved), and lm-eval's own ``simple_evaluate`` runs the tasks: registry names (their datasets come from
the Hugging Face Hub: the node needs the network) and local task YAML files in lm-eval's format,
whose relative data files are made absolute from the task file's folder here. Each metric of each
named task becomes ``task:TASK:METRIC`` (``task:TASK:METRIC@FILTER`` where the task's filter is not
``none``, e.g. ``task:gsm8k:exact_match@strict-match``); a group (mmlu) gives its aggregate.

lm-eval prints some of its messages: they are sent to stderr, since stdout is the event stream.
Python's, numpy's and torch's global seeds are left alone (``simple_evaluate`` would reseed them);
scoring log-likelihoods needs no randomness.

``python -m optjob.steps.tasks --write-registry`` rewrites the registry names ``specs.evaltasks``
checks at validate from the installed lm-eval.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import sys
from pathlib import Path
from typing import Any

from optjob.specs import EvaluateStep
from optjob.specs.errors import StepError
from optjob.specs.evaltasks import REGISTRY_FILE, is_task_file
from torch import nn

#: Result keys of lm-eval that are not metrics.
_NOT_METRICS = ("alias", "name", "sample_len", "samples")
INSTALL_HINT = "evaluate.tasks needs lm-evaluation-harness: pip install 'optjob[eval]'"


def task_config(path: Path) -> dict[str, Any]:
    """A local task file as lm-eval reads it (``include`` merged, ``!function`` resolved), its data
    files made absolute from the file's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.13's loader (private: pinned)

    try:
        config = load_yaml(path)
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise StepError(f"task file {path}: {exc}") from None
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        config["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent)}
    return config


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str) and not Path(value).expanduser().is_absolute() and "://" not in value:
        return str((base / value).resolve())
    return value


def metric_name(task: str, key: str) -> str | None:
    """``task:hellaswag:acc_norm`` for lm-eval's ``acc_norm,none``; None for a standard error or a
    result key that is no metric."""
    metric, _, filt = key.partition(",")
    if metric in _NOT_METRICS or metric.endswith("_stderr"):
        return None
    return f"task:{task}:{metric}" + (f"@{filt}" if filt and filt != "none" else "")


def task_metrics(model: nn.Module, tokenizer: Any, step: EvaluateStep, *, max_length: int | None = None
                 ) -> dict[str, float]:
    """``{task:NAME:METRIC: value}`` of every task of ``step``, scored by lm-eval on ``model``."""
    if not step.tasks:
        return {}
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise StepError(INSTALL_HINT) from None
    specs: list[str | dict[str, Any]] = []
    names: list[str] = []
    for entry in step.tasks:
        if is_task_file(entry):
            config = task_config(Path(entry).expanduser().resolve())
            specs.append(config)
            names.append(str(config.get("task")))
        else:
            specs.append(entry)
            names.append(entry)
    registry = any(isinstance(s, str) for s in specs)
    with contextlib.redirect_stdout(sys.stderr):
        # Indexing the registry reads ~15k YAML files (~20 s): only when a registry task is asked for.
        manager = TaskManager(include_defaults=registry)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=step.batch_size, max_length=max_length)
        try:
            out = simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, num_fewshot=step.task_fewshot, limit=step.task_limit,
                bootstrap_iters=0, log_samples=False, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None,
            )
        except StepError:
            raise
        except Exception as exc:  # a dataset that cannot be fetched, a task config lm-eval refuses
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            hint = " (registry tasks download their datasets from the Hugging Face Hub: the node needs the network)"
            raise StepError(f"lm-eval could not run tasks {', '.join(names)}: {why}" + (hint if registry else "")
                            ) from None
    results = {**(out or {}).get("groups", {}), **(out or {}).get("results", {})}
    metrics: dict[str, float] = {}
    for name in names:
        for key, value in (results.get(name) or {}).items():
            metric = metric_name(name, key)
            if metric is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric] = float(value)
    return metrics


def write_registry(path: Path = REGISTRY_FILE) -> int:
    """Write the installed lm-eval's task, group and tag names (one a line, gzipped); their count."""
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n".join(names) + "\n")
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optjob.steps.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("--write-registry", action="store_true", help=f"write {REGISTRY_FILE}")
    args = parser.parse_args(argv)
    if args.write_registry:
        print(f"wrote {REGISTRY_FILE} ({write_registry():,} names)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
