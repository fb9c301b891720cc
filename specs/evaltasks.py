"""``evaluate.tasks``: which entries name lm-evaluation-harness tasks and which name task files, and
whether each is usable -- checked at validate, before anything is spent. Stdlib and PyYAML only.

An entry ending in ``.yaml``/``.yml`` is a local task file in lm-eval's task YAML format (its data
files local too, relative to the task file's folder); anything else is a task, group or tag name of
lm-eval's registry, checked against the names of lm-eval :data:`REGISTRY_VERSION` (the version the
``eval`` extra and the node lock pin), shipped as ``lm_eval_tasks.txt.gz`` beside this module and written by
``python -m optjob.steps.tasks --write-registry``. Registry tasks download their datasets from the
Hugging Face Hub on the node: they need the network there.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import re
from pathlib import Path
from typing import Any

import yaml

#: The lm-eval version whose registry the shipped task names come from.
REGISTRY_VERSION = "0.4.13"
REGISTRY_FILE = Path(__file__).resolve().parent / "lm_eval_tasks.txt.gz"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
#: Largest task file read at validate.
MAX_TASK_FILE_BYTES = 1 << 20
#: A registry name as lm-eval spells them (letters, digits, ``_-.:`` and ``/`` in a few).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+-]{0,199}$")

#: Rough cost of a task in the plan (``EvaluateStep.task_tokens``): examples of a registry task without
#: ``task_limit`` (hellaswag's validation split has 10,042, arc_easy's test split 2,376, mmlu 14,042,
#: piqa 1,838, winogrande 1,267), and forward tokens per example (a multiple-choice example scores each
#: of ~4 choices with its context, ~128 tokens each).
EXAMPLES_PER_TASK = 5_000
TOKENS_PER_EXAMPLE = 512


def is_task_file(entry: str) -> bool:
    return entry.lower().endswith(TASK_FILE_SUFFIXES)


@functools.lru_cache(maxsize=1)
def registry_names() -> frozenset[str]:
    """Every task, group and tag name of lm-eval :data:`REGISTRY_VERSION`'s registry."""
    with gzip.open(REGISTRY_FILE, "rt", encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip())


def name_problem(entry: str) -> str | None:
    """What is wrong with ``entry`` as an entry of ``evaluate.tasks``, short of reading a task file."""
    if is_task_file(entry):
        return None if entry.strip() == entry and len(entry) <= 4096 else "not a usable task file path"
    if not _NAME.match(entry):
        return (f"{entry!r} is neither an lm-eval task name nor a task file: give a registry name (e.g. hellaswag) "
                "or a path to a task YAML file ending in .yaml")
    names = registry_names()
    if entry in names:
        return None
    close = difflib.get_close_matches(entry, names, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"unknown lm-eval task {entry!r} (not in lm-eval {REGISTRY_VERSION}'s registry){hint} "
            "A local task is a YAML file ending in .yaml")


class _TaskLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads lm-eval's ``!function module.name`` tags as plain strings."""


def _tag_as_text(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    return loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None


_TaskLoader.add_multi_constructor("!", _tag_as_text)


def read_task_file(path: Path) -> dict[str, Any]:
    """A task file's top-level mapping; ``ValueError`` saying what is wrong."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a task YAML file (relative paths are from the spec's folder)")
    if path.stat().st_size > MAX_TASK_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_TASK_FILE_BYTES:,} bytes: not a task file")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable YAML file: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a task file is a YAML mapping (task:, dataset_path:, output_type:, ...)")
    return config


def data_files(config: dict[str, Any]) -> list[str]:
    """The local data files a task config names (``dataset_kwargs.data_files``: a path, a list, or a
    mapping of split to either)."""
    given = (config.get("dataset_kwargs") or {}).get("data_files") if isinstance(config.get("dataset_kwargs"),
                                                                                   dict) else None
    out: list[str] = []
    for value in (given.values() if isinstance(given, dict) else [given]):
        out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return out


def task_file_problem(path: Path) -> str | None:
    """What is wrong with a local task file, or None: it must be a YAML mapping naming its ``task`` (or
    ``include``-ing a file that does), and the data files it names must be there."""
    try:
        config = read_task_file(path)
    except ValueError as exc:
        return str(exc)
    if not isinstance(config.get("task"), str) or not config["task"]:
        return f"{path}: a task file names its task (task: NAME)"
    if "include" not in config and "dataset_path" not in config:
        return f"{path}: task {config['task']!r} names no dataset_path (e.g. dataset_path: json with data_files)"
    for name in data_files(config):
        file = Path(name).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.exists():
            return f"{path}: data file {file} does not exist (relative paths are from the task file's folder)"
    return None


def check_tasks(spec: Any, base: Path) -> list[tuple[tuple[str | int, ...], str]]:
    """(location in the spec, problem) of every evaluate step's task file that is not usable, in the
    pipeline and in each ``compare`` variant; relative paths are from ``base``, the spec's folder."""
    pipeline = list(spec.pipeline)
    where: list[tuple[tuple[str | int, ...], Any]] = [(("steps", i), s) for i, s in enumerate(pipeline)]
    for name, steps in (getattr(spec, "variants", None) or {}).items():
        where += [(("steps", len(pipeline), "compare", name, k), s) for k, s in enumerate(steps)]
    out: list[tuple[tuple[str | int, ...], str]] = []
    for loc, step in where:
        if getattr(step, "kind", None) != "evaluate":
            continue
        for j, entry in enumerate(step.tasks):
            if not is_task_file(entry):
                continue
            path = Path(entry).expanduser()
            problem = task_file_problem(path if path.is_absolute() else base / path)
            if problem is not None:
                out.append(((*loc, "evaluate", "tasks", j), problem))
    return out
