"""YAML -> ``JobSpec``, with every failure turned into one ``SpecError``.

Each problem becomes one line ``FILE:LINE:COL: FIELD.PATH: what to do``. The
loader is defensive because spec files come from anywhere: it bounds the file
size, nesting depth, node count and alias expansion *before* building Python
objects, so YAML bombs and 10,000-deep documents fail in milliseconds.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError
from .job import JobSpec, PathError
from .steps import STEP_TYPES

MAX_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
Loc = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader: no Python object tags. Timestamps stay strings."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar the constructors cannot convert (`!!int abc`, `!!int ` empty, `!!bool x`,
        # `!!timestamp 2020-13-45`, an int of 5,000 digits) raises ValueError, KeyError, IndexError
        # or AttributeError from Python, not a YAML error: give it the node's mark.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as exc:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = node.value if isinstance(node.value, str) else ""
            shown = value if len(value) <= 40 else value[:37] + "..."
            why = f": {exc}" if type(exc) is ValueError else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({shown!r} as {tag}){why}", node.start_mark) from None


# Keep dates and times as plain strings (a region or name must never become a date).
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a spec file. Raises ``SpecError`` and nothing else."""
    p = Path(path)
    return loads_spec(read_user_file(p, what="spec"), source=str(p))


def read_user_file(path: Path, *, what: str = "spec", limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or one ``SpecError``.

    Anything else is refused before a byte is read: a FIFO would block the reader forever,
    ``/dev/zero`` or ``/dev/urandom`` never end, a directory is not a file. The file is opened
    non-blocking (so opening a FIFO returns at once) and checked on the open descriptor, so a
    path swapped for something else between a check and the read cannot slip through; at most
    ``limit + 1`` bytes are ever read, however the file grows meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; give a {what} file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"{path}: is a directory; give a {what} file")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{path}: is {_file_kind(st.st_mode)}, not a regular file; give a {what} file")
        if st.st_size > limit:
            raise SpecError(f"{path}: file is {st.st_size:,} bytes; a {what} is at most {limit:,}")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except SpecError:
        raise
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise SpecError(f"{path}: file grew past {limit:,} bytes while being read; a {what} is at most {limit:,}")
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def loads_spec(text: str | bytes, source: str = "<spec>") -> JobSpec:
    """Validate a spec given as text. Raises ``SpecError`` and nothing else."""
    node, data = _parse(text, source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        lines = [_format(err, node, source) for err in exc.errors()]
        raise SpecError(lines[0], errors=lines) from None
    except RecursionError:
        raise SpecError(f"{source}: document is nested too deeply") from None


def _parse(text: str | bytes, source: str) -> tuple[yaml.Node, Any]:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"{source}: document is {len(text):,} bytes; a spec is at most {MAX_BYTES:,}")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(
                f"{source}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8"
            ) from None
    if len(text) > MAX_BYTES:
        raise SpecError(f"{source}: document is too large; a spec is at most {MAX_BYTES:,} bytes")
    if "\x00" in text:
        raise SpecError(f"{source}: contains NUL bytes; is this a binary file?")
    try:
        _check_shape(text, source)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError(f"{source}: the spec is empty; see `optjob schema` or examples/")
            _check_node(node, source)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark: Any = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML error: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: document is nested too deeply") from None
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else type(data).__name__
        raise SpecError(
            f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: "
            f"the spec must be a mapping (name:, model:, steps:, ...), not {kind}"
        )
    return node, data


def _check_shape(text: str, source: str) -> None:
    """Stream the events (no tree, no recursion) to bound depth and node count."""
    depth = nodes = docs = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                m: Any = event.start_mark
                raise SpecError(f"{source}:{m.line + 1}:{m.column + 1}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.DocumentStartEvent) and (docs := docs + 1) > 1:
            m = event.start_mark
            raise SpecError(f"{source}:{m.line + 1}:{m.column + 1}: one document per spec file, found a second")
        nodes += 1  # noqa: SIM113 - counts events, not loop positions
        if nodes > MAX_NODES:
            raise SpecError(f"{source}: more than {MAX_NODES:,} YAML nodes; a spec is far smaller")


def _check_node(root: yaml.Node, source: str) -> None:
    """Reject duplicate keys and alias expansion beyond MAX_NODES (billion laughs).

    Sizes are memoised per node object, so a bomb is measured in linear time."""
    size: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack: list[yaml.Node] = [root]
    seen: set[int] = set()
    while stack:  # iterative post-order
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        order.append(n)
        if isinstance(n, yaml.MappingNode):
            keys: dict[Any, yaml.Node] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys and k.value != "<<":
                        first = keys[k.value].start_mark
                        raise SpecError(
                            f"{source}:{k.start_mark.line + 1}:{k.start_mark.column + 1}: duplicate key "
                            f"{k.value!r} (first at line {first.line + 1}); remove one"
                        )
                    keys[k.value] = k
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    for n in reversed(order):
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size.get(id(k), 1) + size.get(id(v), 1) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size.get(id(c), 1) for c in n.value)
        else:
            total = 1
        if total > MAX_NODES:
            m = n.start_mark
            raise SpecError(
                f"{source}:{m.line + 1}:{m.column + 1}: aliases expand to more than {MAX_NODES:,} nodes "
                "(a YAML bomb?)"
            )
        size[id(n)] = total


# ---- turning pydantic errors into lines ---------------------------------------------------------


#: How pydantic names a validator wrapper in an error's location: ``function-after[check(), JobSpec]``.
_WRAPPER = re.compile(r"function-(after|before|wrap|plain)\[.*\]\Z", re.S)


def _collapse(loc: Loc, *, key_last: bool = False) -> Loc:
    """Steps validate through a tagged union, which repeats the tag: drop the repeat; and drop
    validator wrappers. ``key_last``: the last segment is the user's own key (an unknown field)."""
    out: list[str | int] = []
    for i, seg in enumerate(loc):
        if out and seg == out[-1] and seg in STEP_TYPES:
            continue
        if isinstance(seg, str) and _WRAPPER.match(seg) and not (key_last and i == len(loc) - 1):
            continue
        out.append(seg)
    return tuple(out)


def format_loc(loc: Loc) -> str:
    s = ""
    for seg in loc:
        if isinstance(seg, int):
            s += f"[{seg}]"
        elif "." in seg or not seg.isidentifier():
            s += f"[{seg!r}]"
        else:
            s += f".{seg}" if s else seg
    return s or "(top level)"


def _node_at(root: yaml.Node, loc: Loc, *, key: bool) -> yaml.Node:
    node = root
    for i, seg in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == seg), None)
            if match is None:
                return node
            node = match[0] if (last and key) else match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and seg < len(node.value):
            node = node.value[seg]
        else:
            return node
    return node


def _strip(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return tp


def _fields_at(loc: Loc) -> list[str]:
    """Names a mapping at ``loc`` accepts (for 'did you mean')."""
    tp: Any = JobSpec
    for seg in loc:
        tp = _strip(tp)
        origin = get_origin(tp)
        if isinstance(seg, int) and origin is list:
            tp = get_args(tp)[0]
        elif origin is dict:
            tp = get_args(tp)[1]
        elif origin in (Union, types.UnionType):
            models = [_strip(a) for a in get_args(tp)]
            tp = next((m.model_fields[seg].annotation for m in models
                       if isinstance(m, type) and issubclass(m, BaseModel) and seg in m.model_fields), None)
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and seg in tp.model_fields:
            tp = tp.model_fields[seg].annotation
        else:
            return []
    tp = _strip(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _message(err: Any, loc: Loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        name = str(loc[-1])
        close = difflib.get_close_matches(name, _fields_at(loc[:-1]), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it or check `optjob schema`"
        return f"unknown field '{name}'{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return "use lowercase letters, digits and dashes, starting with a letter, at most 40 characters"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _format(err: Any, root: yaml.Node, source: str) -> str:
    loc: Loc = _collapse(tuple(err["loc"]), key_last=err["type"] == "extra_forbidden")
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, PathError):
        loc = loc + tuple(ctx_error.loc)
    node = _node_at(root, loc, key=err["type"] == "extra_forbidden")
    m = node.start_mark
    return f"{source}:{m.line + 1}:{m.column + 1}: {format_loc(loc)}: {_message(err, loc)}"
