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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError
from .job import JobSpec, PathError
from .layers import NULL, Layers, UserDefaults, assign, config_hint, merge_defaults, parse_path, split_set
from .steps import STEP_TYPES

MAX_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
#: The longest ``--set`` value.
MAX_SET_CHARS = 10_000
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


# YAML 1.2 floats: `8.0e9` and `1e3` are numbers (YAML 1.1, PyYAML's, wants `8.0e+9`). An integer
# field takes such a number when it is whole (`params: 8.0e9`, `max_steps: 1e3`).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class LoadedSpec:
    """A spec and where its values came from besides its file."""

    spec: JobSpec
    #: The user config that filled some fields, and those fields with their values.
    defaults_file: str | None = None
    from_defaults: tuple[tuple[str, Any], ...] = ()
    #: ``PATH=VALUE`` for each ``--set`` (and ``name=NAME`` for ``--name``), in order.
    overrides: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        """One line per layer, for ``plan``: which values did not come from the spec file."""
        out = []
        if self.from_defaults:
            shown = ", ".join(f"{path}={value}" for path, value in self.from_defaults)
            out.append(f"defaults from {self.defaults_file}: {shown}")
        if self.overrides:
            out.append(f"set on the command line: {', '.join(self.overrides)}")
        return out


def load_spec(path: str | os.PathLike[str], layers: Layers | None = None) -> JobSpec:
    """Read and validate a spec file (with ``layers`` over and under it). Raises ``SpecError`` and
    nothing else."""
    return load_layered(path, layers).spec


def load_layered(path: str | os.PathLike[str], layers: Layers | None = None) -> LoadedSpec:
    """``load_spec``, saying which values came from the user config and the command line."""
    p = Path(path)
    return _load(read_user_file(p, what="spec"), str(p), layers or Layers())


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


def loads_spec(text: str | bytes, source: str = "<spec>", layers: Layers | None = None) -> JobSpec:
    """Validate a spec given as text. Raises ``SpecError`` and nothing else."""
    return _load(text, source, layers or Layers()).spec


def _load(text: str | bytes, source: str, layers: Layers) -> LoadedSpec:
    node, data = _parse(text, source)
    filled: list[str] = []
    overrides: list[str] = []
    if layers:
        # --set and --name first: with them the spec is what the user asked for, and the user
        # config fills in only what that leaves out (its region only under its own cloud).
        for item in layers.sets:
            path, value = split_set(item)
            label = f"--set {path}={value}"
            node = assign(node, parse_path(path, label), _value_node(value, label), label,
                          step_kinds=frozenset(STEP_TYPES))
            overrides.append(f"{path}={value}")
        if layers.name is not None:
            label = f"--name {layers.name}"
            mark = _mark(label)
            node = assign(node, ["name"], yaml.ScalarNode("tag:yaml.org,2002:str", layers.name, mark, mark), label)
            overrides.append(f"name={layers.name}")
        if layers.defaults is not None and (under := _user_defaults(layers.defaults)) is not None:
            assert isinstance(node, yaml.MappingNode)
            node, filled = merge_defaults(node, under)
        data = _construct(node, source)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        lines = [_format(err, node, source) for err in exc.errors()]
        raise SpecError(lines[0], errors=lines) from None
    except RecursionError:
        raise SpecError(f"{source}: document is nested too deeply") from None
    _check_local_paths(spec, node, source)
    _check_data_files(spec, node, source)
    _check_task_files(spec, node, source)
    return LoadedSpec(spec, str(layers.defaults) if filled else None,
                      tuple((f, _value_at(data, f)) for f in filled), tuple(overrides))


def _value_at(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _user_defaults(path: Path) -> yaml.MappingNode | None:
    """The user config's node tree, validated strictly (every problem names the file); None when
    the file is empty."""
    text = read_user_file(path, what="user config")
    if all(not line.strip() or line.lstrip().startswith(b"#") for line in text.splitlines()):
        return None  # empty, or comments only
    source = str(path)
    node, data = _parse(text, source, what="user config")
    try:
        UserDefaults.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc: Loc = _collapse(tuple(err["loc"]), key_last=err["type"] == "extra_forbidden")
            extra = err["type"] == "extra_forbidden"
            why = config_hint(loc) if extra and loc else _message(err, loc)
            lines.append(f"{_where(_node_at(node, loc, key=extra).start_mark, source)}: {format_loc(loc)}: {why}")
        raise SpecError(lines[0], errors=lines) from None
    assert isinstance(node, yaml.MappingNode)
    return node


def _value_node(value: str, label: str) -> yaml.Node:
    """A ``--set`` value as a YAML node (a scalar, or a flow list/mapping), marked with ``label``
    so a problem with it is reported as ``--set PATH=VALUE: ...``."""
    if len(value) > MAX_SET_CHARS:
        raise SpecError(f"{label[:60]}...: the value is longer than {MAX_SET_CHARS:,} characters")
    if "\x00" in value:
        raise SpecError(f"{label}: contains a NUL character")
    mark = _mark(label)
    try:
        _check_shape(value, label)
        loader = _Loader(value)
        loader.name = label
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        raise SpecError(f"{label}: not a YAML value: {exc.problem or exc.context or 'invalid YAML'}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{label}: not a YAML value: {exc}") from None
    if node is None:  # `--set storage.artifacts=`: null
        return yaml.ScalarNode(NULL, "", mark, mark)
    _check_node(node, label)
    return node


def _construct(node: yaml.Node, source: str) -> Any:
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark: Any = exc.problem_mark or exc.context_mark
        raise SpecError(f"{_where(mark, source) if mark else source}: "
                        f"{exc.problem or exc.context or 'invalid YAML'}") from None
    except RecursionError:
        raise SpecError(f"{source}: document is nested too deeply") from None
    finally:
        loader.dispose()


def _mark(label: str) -> yaml.Mark:
    """The mark of a node that came from the command line: no file, no snippet."""
    no_buffer: Any = None
    return yaml.Mark(label, 0, 0, 0, no_buffer, no_buffer)


def _where(mark: Any, source: str) -> str:
    """``FILE:LINE:COL`` of a node: the spec's, the user config's, or the ``--set``/``--name``
    that gave it."""
    name = getattr(mark, "name", None)
    if isinstance(name, str) and name.startswith("--"):
        return name
    if not isinstance(name, str) or not name or name.startswith("<"):
        name = source
    return f"{name}:{mark.line + 1}:{mark.column + 1}"


def _check_local_paths(spec: JobSpec, root: yaml.Node, source: str) -> None:
    """A local model folder or data file that is not there is a spec error now, not after a paid
    launch. Paths are relative to the spec's folder (as apply resolves them); a spec given as text
    (no file) has no folder, and is not checked."""
    base = Path(source).parent if source and Path(source).is_file() else None
    if base is None:
        return
    wanted: list[tuple[tuple[str, ...], str, str]] = []
    if spec.model.path is not None:
        wanted.append((("model", "path"), spec.model.path, "a model folder (with config.json)"))
    if spec.data.kind == "path":
        wanted.append((("data", "source"), spec.data.source, "a .txt/.jsonl file or a folder of them"))
    lines = []
    for loc, value, what in wanted:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            lines.append(f"{_where(_node_at(root, loc, key=False).start_mark, source)}: {'.'.join(loc)}: "
                         f"{path} does not exist; give {what} (relative paths are from the spec's folder)")
    if lines:
        raise SpecError(lines[0], errors=lines)


def _check_data_files(spec: JobSpec, root: yaml.Node, source: str) -> None:
    """A local .jsonl data file is checked record by record (``datafile``): a record without the
    fields its format needs is a spec error naming the line of the data file."""
    from .datafile import check_data

    lines = []
    for field, problem in check_data(spec.data):
        lines.append(f"{_where(_node_at(root, ('data', field), key=False).start_mark, source)}: "
                     f"data.{field}: {problem}")
    if lines:
        raise SpecError(lines[0], errors=lines)


def _check_task_files(spec: JobSpec, root: yaml.Node, source: str) -> None:
    """A local lm-eval task file (``evaluate.tasks``) that is missing, unreadable or names a missing data
    file is a spec error now (``evaltasks.check_tasks``). Relative paths are from the spec's folder."""
    from .evaltasks import check_tasks

    if not (source and Path(source).is_file()):
        return
    lines = [f"{_where(_node_at(root, loc, key=False).start_mark, source)}: {format_loc(loc)}: {problem}"
             for loc, problem in check_tasks(spec, Path(source).parent)]
    if lines:
        raise SpecError(lines[0], errors=lines)


def _parse(text: str | bytes, source: str, what: str = "spec") -> tuple[yaml.Node, Any]:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"{source}: document is {len(text):,} bytes; a {what} is at most {MAX_BYTES:,}")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(
                f"{source}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8"
            ) from None
    if len(text) > MAX_BYTES:
        raise SpecError(f"{source}: document is too large; a {what} is at most {MAX_BYTES:,} bytes")
    if "\x00" in text:
        raise SpecError(f"{source}: contains NUL bytes; is this a binary file?")
    try:
        _check_shape(text, source)
        loader = _Loader(text)
        loader.name = source  # every node's mark names its file (the user config's nodes name theirs)
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
            + (f"the spec must be a mapping (name:, model:, steps:, ...), not {kind}" if what == "spec"
               else f"the {what} must be a mapping, not {kind}")
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
    # pydantic names its classes ("a valid dictionary or instance of BudgetSpec"): say what to write.
    return _CLASS_NAME.sub(" (a mapping of its fields; see `optjob schema`)", msg)


_CLASS_NAME = re.compile(r" or instance of \w+")


def _format(err: Any, root: yaml.Node, source: str) -> str:
    loc: Loc = _collapse(tuple(err["loc"]), key_last=err["type"] == "extra_forbidden")
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, PathError):
        loc = loc + tuple(ctx_error.loc)
    node = _node_at(root, loc, key=err["type"] == "extra_forbidden")
    return f"{_where(node.start_mark, source)}: {format_loc(loc)}: {_message(err, loc)}"
