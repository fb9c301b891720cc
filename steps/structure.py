"""A model's decoder layers, attention and MLP projections, found by structure.

No family allow-list: the decoder layers are the ``nn.ModuleList`` with one entry per
layer; in each layer the projections are its ``nn.Linear`` and transformers ``Conv1D``
modules (gpt2's, weight stored ``[in, out]``), told apart by their role names and
checked by their shapes:

============ =================================== =====================================
part         layouts                             families (as tested)
============ =================================== =====================================
attention    q, k, v + out                       llama, mistral, qwen2/3, gemma/2, phi, opt
             qkv_proj = [q; k; v] rows + out     phi3
             other fused qkv (layout per family) gpt2 c_attn, gpt_neox query_key_value
MLP          gate, up, down                      llama, mistral, qwen2/3, gemma/2
             gate_up = [gate; up] rows, down     phi3
             up, down (no gate)                  phi fc1/fc2, opt fc1/fc2, gpt_neox, gpt2
============ =================================== =====================================

Grouped- and multi-query attention are read from the shapes (k/v rows vs q rows).
``Proj`` hides the ``Conv1D`` transpose: ``weight()`` is always ``[out, in]`` and
``take_out`` / ``take_in`` slice a state dict along the right dimension.

``gpt2_to_linear`` rewrites a gpt2 model as the same network in ``gpt_bigcode``
(nn.Linear everywhere, same parameter names), the form torchao can quantize and
transformers can reload quantized.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from optjob.specs.errors import StepError
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import families

Q = frozenset({"q_proj", "query"})
K = frozenset({"k_proj", "key"})
V = frozenset({"v_proj", "value"})
#: Fused q/k/v whose rows are [all q heads; all k heads; all v heads] (phi3).
QKV_BLOCKED = frozenset({"qkv_proj"})
#: Fused q/k/v whose row order differs by family (gpt2: blocked, gpt_neox: per head).
QKV_OTHER = frozenset({"query_key_value", "c_attn", "Wqkv", "qkv", "W_pack"})
OUT = frozenset({"o_proj", "out_proj", "dense", "c_proj", "wo"})
GATE = frozenset({"gate_proj", "w1"})
UP = frozenset({"up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in"})
DOWN = frozenset({"down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out"})
GATE_UP = frozenset({"gate_up_proj"})


def cast_floats(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, but non-persistent float buffers (rotary tables) keep their
    dtype, as they do when ``from_pretrained`` rebuilds the model: the cast model in
    memory and its reload compute the same thing."""
    kept = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                kept.append((module, name, buf))
    model.to(dtype)
    for module, name, buf in kept:
        module._buffers[name] = buf
    return model


def is_tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the input embedding."""
    get_in: Any = getattr(model, "get_input_embeddings", None)
    get_out: Any = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    return emb is not None and head is not None and head.weight is emb.weight


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class Proj:
    """One projection: its qualified name (state-dict prefix) and module."""

    name: str
    module: nn.Module

    @property
    def conv1d(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def _w(self) -> torch.Tensor:
        w: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return w

    @property
    def in_features(self) -> int:
        return int(self._w.shape[0] if self.conv1d else self._w.shape[1])

    @property
    def out_features(self) -> int:
        return int(self._w.shape[1] if self.conv1d else self._w.shape[0])

    def weight(self) -> torch.Tensor:
        """The weight as fp32 ``[out, in]`` (a detached view or copy)."""
        w = self._w.detach().float()
        return w.t() if self.conv1d else w

    def take_out(self, state: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        """Keep the output features ``idx`` (weight rows of a Linear, columns of a Conv1D; bias)."""
        _take(state, f"{self.name}.weight", idx, 1 if self.conv1d else 0)
        _take(state, f"{self.name}.bias", idx, 0)

    def take_in(self, state: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        """Keep the input features ``idx``."""
        _take(state, f"{self.name}.weight", idx, 0 if self.conv1d else 1)


def _take(state: dict[str, torch.Tensor], key: str, idx: torch.Tensor, dim: int) -> None:
    if key in state:
        state[key] = state[key].index_select(dim, idx.to(state[key].device))


@dataclass
class Attention:
    parent: str
    q: Proj | None = None
    k: Proj | None = None
    v: Proj | None = None
    qkv: Proj | None = None
    qkv_blocked: bool = False
    out: Proj | None = None


@dataclass
class Mlp:
    gate: Proj | None = None
    up: Proj | None = None
    gate_up: Proj | None = None
    down: Proj | None = None
    #: Why these projections are not one dense MLP (None: they are).
    problem: str | None = None

    @property
    def width(self) -> int:
        assert self.down is not None
        return self.down.in_features


@dataclass
class Block:
    """One decoder layer: its state-dict prefix and its projections."""

    prefix: str
    attention: Attention | None
    mlp: Mlp


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, modules) of the decoder layers: the first ModuleList with one
    entry per layer, each holding projections."""
    config: Any = getattr(model, "config", None)
    n = families.field(config, *families.LAYERS) if config is not None else None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if n is not None and len(module) != int(n):
            continue
        if all(any(is_projection(m) for m in layer.modules()) for layer in module):
            return name, module
    family = families.model_type(config) if config is not None else type(model).__name__
    raise StepError(f"could not find the decoder layers of this {family} model")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def find_attention(module: nn.Module, prefix: str = "") -> Attention | None:
    """The attention projections under ``module`` (names prefixed with ``prefix``)."""
    projs = [(n, m) for n, m in module.named_modules() if n and is_projection(m)]
    anchors = [n for n, _ in projs if _leaf(n) in Q | QKV_BLOCKED | QKV_OTHER]
    if not anchors:
        return None
    parent = _parent(anchors[0])
    attn = Attention(parent=prefix + parent)
    for n, m in projs:
        if _parent(n) != parent:
            continue
        proj, leaf = Proj(prefix + n, m), _leaf(n)
        if leaf in Q:
            attn.q = proj
        elif leaf in K:
            attn.k = proj
        elif leaf in V:
            attn.v = proj
        elif leaf in QKV_BLOCKED | QKV_OTHER:
            attn.qkv, attn.qkv_blocked = proj, leaf in QKV_BLOCKED
        elif leaf in OUT:
            attn.out = proj
    return attn


def find_mlp(module: nn.Module, prefix: str = "", skip: str | None = None) -> Mlp:
    """The MLP projections under ``module`` (those not under ``skip``, the attention)."""
    mlp = Mlp()
    seen: dict[str, list[Proj]] = {"gate": [], "up": [], "down": [], "gate_up": []}
    for n, m in module.named_modules():
        if not n or not is_projection(m):
            continue
        if skip is not None and (prefix + n).startswith(skip + "."):
            continue
        leaf = _leaf(n)
        for role, names in (("gate", GATE), ("up", UP), ("down", DOWN), ("gate_up", GATE_UP)):
            if leaf in names:
                seen[role].append(Proj(prefix + n, m))
    if any(len(v) > 1 for v in seen.values()):
        mlp.problem = "its layers hold several MLPs (mixture of experts)"
        return mlp
    mlp.gate, mlp.up, mlp.down, mlp.gate_up = (next(iter(seen[r]), None) for r in ("gate", "up", "down", "gate_up"))
    mlp.problem = _mlp_shape_problem(mlp)
    return mlp


def _mlp_shape_problem(mlp: Mlp) -> str | None:
    if mlp.down is None or (mlp.up is None and mlp.gate_up is None):
        return "no MLP up/down projections were found in its layers"
    width = mlp.down.in_features
    if mlp.gate_up is not None:
        ok = mlp.gate_up.out_features == 2 * width and mlp.up is None and mlp.gate is None
    else:
        assert mlp.up is not None
        ok = mlp.up.out_features == width and (mlp.gate is None or mlp.gate.out_features == width)
    return None if ok else "its MLP projections' shapes do not line up (up rows vs down columns)"


def blocks(model: nn.Module) -> list[Block]:
    name, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        prefix = f"{name}.{i}."
        attn = find_attention(layer, prefix)
        mlp = find_mlp(layer, prefix, skip=attn.parent if attn is not None else None)
        out.append(Block(prefix=prefix, attention=attn, mlp=mlp))
    return out


# --------------------------------------------------------------------------- scores


def mlp_scores(mlp: Mlp) -> torch.Tensor:
    """Importance of each MLP neuron: |gate row| * |up row| * |down column| (no gate: 1)."""
    assert mlp.down is not None
    width = mlp.width
    down = mlp.down.weight().norm(dim=0)
    if mlp.gate_up is not None:
        w = mlp.gate_up.weight()
        return w[:width].norm(dim=1) * w[width:].norm(dim=1) * down
    assert mlp.up is not None
    score = mlp.up.weight().norm(dim=1) * down
    if mlp.gate is not None:
        score = score * mlp.gate.weight().norm(dim=1)
    return score


def head_scores(attn: Attention, n_heads: int, head_dim: int) -> torch.Tensor:
    """Importance of each query head: norm of its block of output-projection columns."""
    assert attn.out is not None
    w = attn.out.weight()
    return w.view(w.shape[0], n_heads, head_dim).norm(dim=(0, 2))


def head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """The feature indices of ``heads`` (each ``head_dim`` wide), shifted by ``offset``."""
    idx = heads[:, None] * head_dim + torch.arange(head_dim)[None, :]
    return idx.reshape(-1) + offset


def attention_problem(attn: Attention | None, n_heads: int, n_kv: int, head_dim: int) -> str | None:
    """Why heads cannot be cut out of ``attn`` (None: they can)."""
    if attn is None:
        return "no attention projections were found in its layers"
    if attn.out is None:
        return "no attention output projection was found"
    if attn.qkv is not None and not attn.qkv_blocked:
        leaf = _leaf(attn.qkv.name)
        return f"its fused query/key/value projection ({leaf}) orders its rows in a way optjob does not cut"
    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
    if attn.qkv is not None:
        ok = attn.qkv.out_features == q_rows + 2 * kv_rows
    else:
        parts = (attn.q, attn.k, attn.v)
        ok = all(p is not None for p in parts) and (
            attn.q.out_features == q_rows  # type: ignore[union-attr]
            and attn.k.out_features == kv_rows  # type: ignore[union-attr]
            and attn.v.out_features == kv_rows  # type: ignore[union-attr]
        )
    if not ok or attn.out.in_features != q_rows:
        return "its attention projections do not have the shapes its config gives (heads x head width)"
    return None


def cut_heads(
    state: dict[str, torch.Tensor], attn: Attention, q_keep: torch.Tensor, kv_keep: torch.Tensor,
    n_heads: int, n_kv: int, head_dim: int,
) -> None:  # fmt: skip
    """Keep query heads ``q_keep`` and key/value heads ``kv_keep`` in ``state``."""
    q_idx, kv_idx = head_rows(q_keep, head_dim), head_rows(kv_keep, head_dim)
    if attn.qkv is not None:
        q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
        rows = torch.cat([q_idx, kv_idx + q_rows, kv_idx + q_rows + kv_rows])
        attn.qkv.take_out(state, rows)
    else:
        for proj, idx in ((attn.q, q_idx), (attn.k, kv_idx), (attn.v, kv_idx)):
            assert proj is not None
            proj.take_out(state, idx)
    assert attn.out is not None
    attn.out.take_in(state, q_idx)


def cut_mlp(state: dict[str, torch.Tensor], mlp: Mlp, keep: torch.Tensor) -> None:
    """Keep MLP neurons ``keep`` in ``state``."""
    assert mlp.down is not None
    if mlp.gate_up is not None:
        mlp.gate_up.take_out(state, torch.cat([keep, keep + mlp.width]))
    for proj in (mlp.gate, mlp.up):
        if proj is not None:
            proj.take_out(state, keep)
    mlp.down.take_in(state, keep)


# --------------------------------------------------------------------------- rebuild


def shape_mismatch(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> str | None:
    """Build ``type(model)(config)`` on the meta device (no memory) and name the first
    tensor of ``state`` whose shape differs (None: every shape matches)."""
    with torch.device("meta"):
        probe = type(model)(config)
    for key, want in probe.state_dict().items():
        have = state.get(key)
        if have is not None and tuple(have.shape) != tuple(want.shape):
            return f"{key}: {tuple(have.shape)} vs {tuple(want.shape)}"
    return None


# --------------------------------------------------------------------------- gpt2


def has_conv1d(model: nn.Module) -> bool:
    return any(isinstance(m, Conv1D) for m in model.modules())


def gpt2_to_linear(model: nn.Module) -> nn.Module:
    """The same network as ``model`` (a gpt2 LM) written as a ``gpt_bigcode`` LM: every
    Conv1D becomes an nn.Linear (weights transposed), the fused q/k/v rows reordered to
    gpt_bigcode's per-head layout. Same parameter names, same logits (checked by the
    tests); on ``model``'s device and dtype."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config: Any = model.config
    if families.model_type(config) != "gpt2":
        raise StepError(f"only gpt2 has an nn.Linear twin here, not {families.model_type(config)}")
    blocked = [name for name in families.GPT2_ONLY_OPTIONS if getattr(config, name, False)]
    if blocked:
        raise StepError(f"gpt2 with {', '.join(blocked)} has no gpt_bigcode twin")
    keep = {
        k: getattr(config, k)
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                  "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "layer_norm_epsilon", "initializer_range", "scale_attn_weights",
                  "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    }  # fmt: skip
    new_config = GPTBigCodeConfig(multi_query=False, **keep)
    embed, heads = int(config.n_embd), int(config.n_head)
    hd = embed // heads
    # gpt2's fused output is [q | k | v] (each heads x hd); gpt_bigcode's is per head [q_h k_h v_h].
    order = torch.arange(3 * embed).view(3, heads, hd).transpose(0, 1).reshape(-1)
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    state = {}
    for key, value in model.state_dict().items():
        owner, _, kind = key.rpartition(".")
        value = value.detach()
        if owner in convs and kind == "weight":
            value = value.t()
        if owner.endswith("attn.c_attn"):
            value = value.index_select(0, order.to(value.device))
        state[key] = value.contiguous()
    ref = next(model.parameters())
    with torch.device(ref.device):
        new: nn.Module = GPTBigCodeForCausalLM(new_config)
    new.to(ref.dtype)
    new.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
