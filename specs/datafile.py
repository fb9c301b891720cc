"""The records of a local data file: which format they are in, and whether each has what that
format needs (``data.format``).

Shared by the validator -- ``optjob validate`` / ``plan`` / ``apply`` check a local .jsonl file
record by record before anything is spent, naming the line of the data file -- and by the workload,
which reads the same records. Stdlib only.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: ``data.format`` values whose records are rendered, with a loss mask, rather than read as text.
RECORD_FORMATS = ("chat", "prompt-completion")
#: Roles a chat message may have.
ROLES = ("system", "user", "assistant", "tool")
#: Most problems listed for one data file.
MAX_PROBLEMS = 5


def detect_format(record: Any) -> str:
    """The format a record is in: ``chat`` (``messages``), ``prompt-completion`` (``prompt`` and
    ``completion``), otherwise ``text``."""
    if isinstance(record, dict):
        if "messages" in record:
            return "chat"
        if "prompt" in record and "completion" in record:
            return "prompt-completion"
    return "text"


def record_problem(record: Any, fmt: str, text_field: str = "text") -> str | None:
    """What is wrong with ``record`` as a record of format ``fmt``; None when nothing is."""
    if not isinstance(record, dict):
        return f"a record is a JSON object, not {type(record).__name__}"
    if fmt == "text":
        if text_field not in record:
            return f"no field {text_field!r} (set data.text_field, or data.format for chat/prompt-completion records)"
        return None
    if fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if key not in record:
                return f"no field {key!r} (format prompt-completion needs prompt and completion)"
            if not isinstance(record[key], str):
                return f"{key} is {type(record[key]).__name__}, not a string"
        if not record["completion"]:
            return "completion is empty: nothing to train on"
        return None
    messages = record.get("messages")
    if messages is None:
        return "no field 'messages' (format chat needs messages: [{role, content}, ...])"
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content}"
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{n}] is not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{n}].role is {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"messages[{n}].content must be a string" + (" (it is missing)" if content is None else "")
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    return None


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for every non-blank line of a .jsonl file; a line that is not
    JSON raises ``ValueError`` naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None


def jsonl_files(source: str) -> list[Path]:
    """The local .jsonl files of ``source`` (a file, or the .jsonl files in a folder), sorted; none
    for builtin/hub sources and for paths that do not exist here (they may exist on the node)."""
    if source.startswith(("builtin:", "hf:")):
        return []
    path = Path(source).expanduser()
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if stat.S_ISDIR(mode):
        return sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    return [path] if path.suffix == ".jsonl" else []


def first_record(files: list[Path]) -> Any:
    """The first record of ``files`` (None when they hold none)."""
    for file in files:
        for _, record in read_records(file):
            return record
    return None


def check_source(source: str, fmt: str | None, text_field: str = "text") -> tuple[str | None, list[str]]:
    """Check every record of a local .jsonl ``source`` against ``fmt`` (detected from the first
    record when None). Returns (the format, problems as ``FILE:LINE: what``)."""
    files = jsonl_files(source)
    if not files:
        return fmt, []
    problems: list[str] = []
    try:
        if fmt is None:
            fmt = detect_format(first_record(files))
        for file in files:
            if not stat.S_ISREG(os.stat(file).st_mode):  # a FIFO would block the read forever
                problems.append(f"{file}: not a regular file")
                continue
            for n, record in read_records(file):
                problem = record_problem(record, fmt, text_field)
                if problem is not None:
                    problems.append(f"{file}:{n}: {problem}")
                    if len(problems) >= MAX_PROBLEMS:
                        return fmt, problems
    except UnicodeDecodeError as exc:
        problems.append(f"{source}: not UTF-8 text (byte {exc.start} of a line)")
    except ValueError as exc:  # a line that is not JSON
        problems.append(str(exc))
    except OSError as exc:
        problems.append(f"{source}: cannot read: {exc.strerror or exc}")
    return fmt, problems


def check_data(data: Any) -> list[tuple[str, str]]:
    """``(field, problem)`` for the local data files of a ``DataSpec``: source and eval_source."""
    out: list[tuple[str, str]] = []
    fmt = data.format
    for name in ("source", "eval_source"):
        value = getattr(data, name)
        if value is None:
            continue
        found, problems = check_source(value, fmt, data.text_field)
        fmt = fmt or found  # the eval file is read in the train file's format
        out.extend((name, p) for p in problems)
    return out
