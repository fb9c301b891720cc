"""Sharded data parallelism (``train.strategy: fsdp``): torch's own ``fully_shard`` (FSDP2).

Each transformer block (the classes a transformers model lists in ``_no_split_modules``, else the
children of its longest ``ModuleList``) is its own FSDP unit, then the root (embeddings, final
norm, output head). Every parameter becomes a DTensor sharded along its first dimension among the
processes: a process keeps 1/world of the weights, gradients and optimizer state, gathers one block's
weights for its forward and backward, and reduce-scatters (averages) the gradients -- the gradient
of the global batch's mean loss, as DDP's all-reduce gives. So a run matches one process up to
float rounding, on gloo (CPU) as on NCCL.

Checkpoints hold the full, unsharded state in the same format as a single process's
(``torch.distributed.checkpoint.state_dict``: ``full_state_dict`` gathered to rank 0's CPU,
``broadcast_from_rank0`` back): the model's ``state_dict()`` and the optimizer's ``state_dict()``
keyed by parameter index, so a checkpoint resumes with any number of processes, sharded or not.

The output is a plain module again (``unshard``): the full weights loaded into a copy of the model
made before sharding, whose parameters were left on the meta device (no memory) until then.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
import torch.distributed as td
from torch import nn

from . import dist


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class ``_no_split_modules`` names (transformers'
    own list of what must stay whole), else the children of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists: list[list[nn.Module]] = [list(m) for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


def shell(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (tied ones still tied) and whose
    buffers are real copies: the plain module ``unshard`` fills with the trained weights."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place among every process (one FSDP unit per block, then the root), from
    rank 0's weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # rank 0's weights everywhere, as DDP starts (fully_shard keeps each rank's own)
        for t in [*model.parameters(), *model.buffers()]:
            td.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.world(),))
    units = blocks(model)
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.is_main():
        print(f"fsdp: {len(units)} blocks and the root sharded among {dist.world()} processes",
              file=sys.stderr, flush=True)
    return model


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The full ``state_dict()`` on rank 0's CPU ({} on the other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0's CPU, keyed by parameter index as a single process's
    ``optimizer.state_dict()`` is ({} on the other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    return indexed(full, param_names(model, optimizer)) if full else {}


def load(model: nn.Module, optimizer: torch.optim.Optimizer, parts: dict[str, Any]) -> None:
    """Load a full checkpoint (``parts["model"]``, ``parts["optimizer"]``, read on rank 0 only: the
    other ranks pass {}) into the sharded model and its optimizer. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = parts.get("model", {}) if dist.is_main() else {}
    set_model_state_dict(model, weights, options=_options(broadcast_from_rank0=True))
    saved = parts.get("optimizer", {}) if dist.is_main() else {}
    named = by_name(saved, param_names(model, optimizer)) if saved else {}
    set_optimizer_state_dict(model, optimizer, named, options=_options(broadcast_from_rank0=True))


def unshard(model: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (a ``shell`` of the model) holding the sharded ``model``'s full weights, on every
    rank, on the device they were on. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    groups: dict[int, list[str]] = {}
    for name, p in plain.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    plain.load_state_dict(full, strict=True, assign=True)
    for names in groups.values():  # assign=True gave each name its own tensor: tie them again
        first = plain.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(owner), attr, first)
    return plain


# -- the optimizer state: by parameter index (a single process's format) or by name (torch's) -----------


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """For each of the optimizer's parameters in index order, every name it has in ``model``."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def indexed(named: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """torch's name-keyed optimizer state -> ``optimizer.state_dict()``'s index-keyed format."""
    index = {n: i for i, aliases in enumerate(names) for n in aliases}
    state = {index[k]: v for k, v in named.get("state", {}).items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def by_name(saved: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """``optimizer.state_dict()``'s index-keyed format -> torch's name-keyed one."""
    state = {names[int(i)][0]: v for i, v in saved.get("state", {}).items()}
    groups = [{**g, "params": [names[int(i)][0] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
