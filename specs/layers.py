"""What goes over and under a spec file: ``--set PATH=VALUE`` and ``--name`` on top, the user's
config (``$OPTJOB_HOME/config.yaml``: default cloud, region, bucket, budget, teardown) underneath.

Both work on the YAML node tree the loader composed, before anything is validated, so a value that
came from ``--set`` or from the config is reported where it came from: ``--set budget.max_usd=abc:
budget.max_usd: ...`` or ``~/.optjob/config.yaml:3:9: teardown: ...``. The tree is never changed in
place: every mapping or list on the way to a changed value is copied (a value shared through a YAML
alias elsewhere stays as written there).

The loader (``loader.load_layered``) composes the nodes and calls these; this module imports nothing
of the loader.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import field_validator

from .base import StrictModel
from .errors import SpecError
from .resources import _REGION, BudgetSpec, Cloud, StorageSpec, Teardown

STR, MAP, NULL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:null"
#: What the user config may set, as a sentence (its errors say it).
CONFIG_FIELDS = "resources.cloud, resources.region, storage.artifacts, budget and teardown"
Seg = str | int


@dataclass(frozen=True)
class Layers:
    """``sets``: ``PATH=VALUE`` texts, applied in order (a later one wins); ``name``: the job name
    (``--name``); ``defaults``: the user config file, merged under the spec (None: none)."""

    sets: tuple[str, ...] = ()
    name: str | None = None
    defaults: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.sets or self.name is not None or self.defaults is not None)


# ---- the user config -------------------------------------------------------------------------------


class DefaultResources(StrictModel):
    cloud: Cloud | None = None
    """The cloud of a spec that names none."""
    region: str | None = None
    """The region of a spec that names none, when it runs on this cloud."""

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _REGION.match(v):
            raise ValueError(f"{v!r} is not a region name (lowercase letters, digits, dashes)")
        return v


class UserDefaults(StrictModel):
    """``$OPTJOB_HOME/config.yaml``: defaults every spec gets where it does not say otherwise."""

    resources: DefaultResources | None = None
    storage: StorageSpec | None = None
    budget: BudgetSpec | None = None
    teardown: Teardown | None = None


def config_hint(loc: tuple[Any, ...]) -> str:
    """What an unknown key of the user config should have been."""
    name, parent = str(loc[-1]), loc[:-1]
    known = {(): list(UserDefaults.model_fields), ("resources",): ["cloud", "region"],
             ("storage",): ["artifacts"], ("budget",): list(BudgetSpec.model_fields)}.get(tuple(parent), [])
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"unknown key '{name}'" + (f"; did you mean '{close[0]}'?" if close
                                      else f"; the user config sets only {CONFIG_FIELDS}")


def _key(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _get(node: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next(((k, v) for k, v in node.value if _key(k) == key), None)


def _scalar(node: yaml.Node | None) -> str | None:
    return str(node.value) if isinstance(node, yaml.ScalarNode) and node.tag != NULL else None


def _with_pair(mapping: yaml.MappingNode, key: yaml.Node, value: yaml.Node) -> yaml.MappingNode:
    """A copy of ``mapping`` with ``key`` set to ``value`` (replaced in place of an equal key)."""
    pairs = list(mapping.value)
    at = next((i for i, (k, _) in enumerate(pairs) if _key(k) == _key(key)), None)
    if at is None:
        pairs.append((key, value))
    else:
        pairs[at] = (pairs[at][0], value)
    return yaml.MappingNode(mapping.tag, pairs, mapping.start_mark, mapping.end_mark, mapping.flow_style)


def merge_defaults(root: yaml.MappingNode, defaults: yaml.MappingNode) -> tuple[yaml.MappingNode, list[str]]:
    """``root`` with the user config's values where the spec has none; and the fields they filled
    (``resources.cloud``, ``budget.max_usd``...). The spec wins field by field. The config's region
    comes with its cloud: it applies when the spec names no cloud or names the config's."""
    filled: list[str] = []
    for section in ("resources", "storage", "budget", "teardown"):
        dpair = _get(defaults, section)
        if dpair is None or (isinstance(dpair[1], yaml.ScalarNode) and dpair[1].tag == NULL):
            continue
        dkey, dval = dpair
        mine = _get(root, section)
        if mine is None or (isinstance(mine[1], yaml.ScalarNode) and mine[1].tag == NULL):
            if isinstance(dval, yaml.MappingNode):
                wanted = [(k, v) for k, v in dval.value if _wanted(section, _key(k), root, dval)]
                if not wanted:
                    continue
                dval = yaml.MappingNode(MAP, wanted, dval.start_mark, dval.end_mark, dval.flow_style)
                filled += [f"{section}.{_key(k)}" for k, _ in wanted]
            else:  # teardown, or a budget shorthand ("$20")
                filled.append(section)
            root = _with_pair(root, dkey, dval)
            continue
        mkey, mval = mine
        if not (isinstance(mval, yaml.MappingNode) and isinstance(dval, yaml.MappingNode)):
            continue  # the spec's own value (a scalar such as teardown, or a budget shorthand) wins whole
        for k, v in dval.value:
            if _get(mval, _key(k)) is None and _wanted(section, _key(k), root, dval):
                mval = _with_pair(mval, k, v)
                filled.append(f"{section}.{_key(k)}")
        root = _with_pair(root, mkey, mval)
    return root, filled


def _wanted(section: str, field: Any, root: yaml.MappingNode, dsection: yaml.MappingNode) -> bool:
    if (section, field) != ("resources", "region"):
        return True
    resources = _get(root, "resources")
    spec_cloud = _scalar(pair[1]) if resources and (pair := _get(resources[1], "cloud")) else None
    config_cloud = _scalar(pair[1]) if (pair := _get(dsection, "cloud")) else None
    return spec_cloud is None or config_cloud is None or spec_cloud == config_cloud


# ---- --set PATH=VALUE ------------------------------------------------------------------------------

_SEG = re.compile(r"""\.?(?:([A-Za-z_][\w-]*|\d+)|\[(\d+)\]|\[(['"])(.*?)\3\])""")


def split_set(text: str) -> tuple[str, str]:
    """``"budget.max_usd=5"`` -> ``("budget.max_usd", "5")``."""
    path, eq, value = text.partition("=")
    if not eq or not path.strip():
        raise SpecError(f"--set {text}: write --set PATH=VALUE, e.g. --set budget.max_usd=5")
    return path.strip(), value


def parse_path(path: str, label: str) -> list[Seg]:
    """``steps.0.train.lr``, ``steps[0].train.lr``, ``steps.0.hpo.space['train.lr']`` -> segments
    (list positions as ints)."""
    segs: list[Seg] = []
    at = 0
    while at < len(path):
        m = _SEG.match(path, at)
        if m is None or (at == 0 and path.startswith(".")) or m.end() == at:
            raise SpecError(f"{label}: {path!r} is not a field path; write it as in the spec, "
                            "e.g. budget.max_usd or steps.0.train.lr")
        name, index, _, quoted = m.groups()
        segs.append(int(index) if index is not None else quoted if quoted is not None
                    else int(name) if name.isdigit() else name)
        at = m.end()
    return segs


def shown(segs: list[Seg]) -> str:
    """Segments as the user writes them: ``steps.0.train``."""
    return ".".join(str(s) for s in segs) or "(top level)"


def assign(root: yaml.Node, segs: list[Seg], value: yaml.Node, label: str, *,
           step_kinds: frozenset[str] = frozenset()) -> yaml.Node:
    """A copy of ``root`` with the node at ``segs`` replaced by ``value`` (created with its missing
    mappings). A path that runs through a single value, past the end of a list, or into a step
    without its kind, is a ``SpecError`` naming the path."""
    return _assign(root, segs, 0, value, label, step_kinds, in_steps=False)


def _assign(node: yaml.Node, segs: list[Seg], i: int, value: yaml.Node, label: str,
            step_kinds: frozenset[str], *, in_steps: bool) -> yaml.Node:
    if i == len(segs):
        return value
    here = shown(segs[:i])
    if isinstance(node, yaml.SequenceNode):
        seg = segs[i]
        if not isinstance(seg, int):
            raise SpecError(f"{label}: {here} is a list; give an item's number, e.g. {here}.0")
        if not 0 <= seg < len(node.value):
            raise SpecError(f"{label}: {here} has {len(node.value)} item(s), numbered from 0; "
                            f"there is no {here}.{seg}")
        items = list(node.value)
        items[seg] = _assign(items[seg], segs, i + 1, value, label, step_kinds, in_steps=here == "steps")
        return yaml.SequenceNode(node.tag, items, node.start_mark, node.end_mark, node.flow_style)
    if isinstance(node, yaml.MappingNode):
        seg, take = _match_key(node, segs, i)
        if in_steps and isinstance(seg, str):
            kinds = [k for k in (_key(k) for k, _ in node.value) if k in step_kinds]
            if len(kinds) == 1 and seg != kinds[0]:
                raise SpecError(f"{label}: {here} is a {kinds[0]} step, not {seg}" if seg in step_kinds
                                else f"{label}: {here} is a {kinds[0]} step; write {here}.{kinds[0]}."
                                     f"{shown(segs[i:])}")
        pair = _get(node, str(seg))
        mark = value.start_mark
        child: yaml.Node = (pair[1] if pair is not None else
                            yaml.MappingNode(MAP, [], mark, mark))  # a missing mapping is created
        if pair is not None and isinstance(child, yaml.ScalarNode) and child.tag == NULL and i + take < len(segs):
            child = yaml.MappingNode(MAP, [], mark, mark)  # `storage:` left empty in the spec
        key = pair[0] if pair is not None else yaml.ScalarNode(STR, str(seg), mark, mark)
        new = _assign(child, segs, i + take, value, label, step_kinds, in_steps=False)
        return _with_pair(node, key, new)
    shown_value = _scalar(node)
    raise SpecError(f"{label}: {here} is a single value"
                    + (f" ({shown_value!r})" if shown_value is not None and len(shown_value) <= 40 else "")
                    + f", not a mapping; set {here} itself")


def _match_key(node: yaml.MappingNode, segs: list[Seg], i: int) -> tuple[Seg, int]:
    """The key at ``segs[i]``; a key with dots in it (an hpo space's ``train.lr``) may span segments."""
    if _get(node, str(segs[i])) is not None:
        return segs[i], 1
    for n in range(len(segs) - i, 1, -1):
        joined = ".".join(str(s) for s in segs[i:i + n])
        if _get(node, joined) is not None:
            return joined, n
    # A new key beside dotted ones (a new dimension of an hpo space): as many parts as they have.
    like = [str(_key(k)).count(".") + 1 for k, _ in node.value if str(_key(k)).startswith(f"{segs[i]}.")]
    if like and i + like[0] <= len(segs):
        return ".".join(str(s) for s in segs[i:i + like[0]]), like[0]
    return segs[i], 1
