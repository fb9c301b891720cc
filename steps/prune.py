"""``prune``: zero the smallest weights (magnitude) or cut whole MLP neurons and
attention heads out of a Llama-style model (structured).

magnitude
    Global unstructured L1 over every ``nn.Linear`` weight except the output head
    (``torch.nn.utils.prune.global_unstructured``). The masks are folded into the
    weights at once (``prune.remove``), kept aside, and re-applied after every optimizer
    step of the optional recovery fine-tune, so the model is always a plain
    transformers model: a checkpoint, the saved output and a reload see ``weight``
    tensors, never ``weight_orig``/``weight_mask`` (which transformers would silently
    re-initialise on load).
structured
    Per layer, drop the least important MLP neurons (L2 norms of the gate and up rows
    times the down column) and attention heads (norm of the head's ``o_proj`` column
    block), then build a smaller model from an updated config (``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``, explicit ``head_dim``), so the
    result saves and reloads as an ordinary checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from optjob.specs import PruneStep, TrainStep
from optjob.specs.errors import StepError
from torch import nn
from torch.nn.utils import prune as torch_prune

from .context import StepContext, StepOutcome

#: transformers families whose blocks have q/k/v/o and gate/up/down Linear layers.
STRUCTURED_FAMILIES = ("llama", "mistral", "qwen2")


# --------------------------------------------------------------------------- magnitude


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` except the output head (lm_head), by qualified name."""
    getter: Any = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head and not name.endswith("lm_head")
    ]


def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-|w| prunable weights, globally.

    The masks are folded into the weights; they are returned (name -> bool tensor) so a
    fine-tune can keep the pruned weights at zero."""
    layers = prunable_linears(model)
    if not layers:
        raise StepError("magnitude pruning found no nn.Linear layers to prune")
    params = [(mod, "weight") for _, mod in layers]
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=sparsity
    )
    masks: dict[str, torch.Tensor] = {}
    for name, mod in layers:
        mask: Any = mod.weight_mask
        masks[name] = mask.detach().to(torch.bool).clone()
        torch_prune.remove(mod, "weight")
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (after an optimizer step moved them)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        weight.mul_(mask.to(weight.device))


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the prunable Linear layers."""
    total = zeros = 0
    for _, mod in prunable_linears(model):
        total += mod.weight.numel()
        zeros += int((mod.weight == 0).sum())
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------- structured


def _check_llama_like(model: nn.Module) -> Any:
    config: Any = model.config
    family = getattr(config, "model_type", "?")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and all(
        hasattr(layer, "self_attn") and hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj")
        for layer in layers
    )
    if family not in STRUCTURED_FAMILIES or not ok:
        raise StepError(
            f"structured pruning supports {', '.join(STRUCTURED_FAMILIES)} models, not {family!r}",
            hint="use method: magnitude",
        )
    return config


def _head_dim(config: Any) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def mlp_scores(mlp: Any) -> torch.Tensor:
    """Importance of each MLP neuron: |gate row| * |up row| * |down column|."""
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    return gate * up * down


def head_scores(attn: Any, n_heads: int, head_dim: int) -> torch.Tensor:
    """Importance of each query head: norm of its block of ``o_proj`` columns."""
    w = attn.o_proj.weight.detach().float()
    return w.view(w.shape[0], n_heads, head_dim).norm(dim=(0, 2))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def keep_heads(scores: torch.Tensor, n_kv: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, kv heads kept). MHA keeps any heads (with their k/v);
    GQA keeps every kv group and the same number of query heads in each."""
    n_heads = scores.numel()
    if n_kv == n_heads:
        kept = _top(scores, keep)
        return kept, kept
    if keep % n_kv:
        raise StepError(
            f"keeping {keep} of {n_heads} attention heads does not split evenly over the "
            f"{n_kv} key/value heads (grouped-query attention)",
            hint=f"choose heads_fraction so the heads kept are a multiple of {n_kv}",
        )
    group = n_heads // n_kv
    per = keep // n_kv
    groups = [g * group + _top(scores[g * group : (g + 1) * group], per) for g in range(n_kv)]
    return torch.cat(groups), torch.arange(n_kv)


def _rows(t: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    idx = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    return t.index_select(0, idx.to(t.device))


def _take(state: dict[str, torch.Tensor], key: str, idx: torch.Tensor, dim: int) -> None:
    if key in state:
        state[key] = state[key].index_select(dim, idx.to(state[key].device))


def shrink(
    model: nn.Module, *, intermediate: int | None = None, heads: int | None = None
) -> nn.Module:
    """A new, smaller model: each layer keeps its ``intermediate`` most important MLP
    neurons and ``heads`` most important query heads (None: unchanged)."""
    config = _check_llama_like(model)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = _head_dim(config)
    if heads is not None and not 1 <= heads <= n_heads:
        raise StepError(f"cannot keep {heads} of {n_heads} attention heads")
    if intermediate is not None and not 1 <= intermediate <= config.intermediate_size:
        raise StepError(f"cannot keep {intermediate} of {config.intermediate_size} MLP neurons")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    new_kv = n_kv
    inner: Any = model.model
    blocks = inner.layers
    for i, layer in enumerate(blocks):
        pre = f"model.layers.{i}."
        if intermediate is not None and intermediate < config.intermediate_size:
            keep = _top(mlp_scores(layer.mlp), intermediate)
            for key in (pre + "mlp.gate_proj.", pre + "mlp.up_proj."):
                _take(state, key + "weight", keep, 0)
                _take(state, key + "bias", keep, 0)
            _take(state, pre + "mlp.down_proj.weight", keep, 1)
        if heads is not None and heads < n_heads:
            scores = head_scores(layer.self_attn, n_heads, head_dim)
            q_keep, kv_keep = keep_heads(scores, n_kv, heads)
            new_kv = kv_keep.numel()
            for name, kept in (("q_proj", q_keep), ("k_proj", kv_keep), ("v_proj", kv_keep)):
                for p in ("weight", "bias"):
                    key = pre + f"self_attn.{name}.{p}"
                    if key in state:
                        state[key] = _rows(state[key], kept, head_dim)
            o = state[pre + "self_attn.o_proj.weight"]
            state[pre + "self_attn.o_proj.weight"] = _rows(o.t(), q_keep, head_dim).t()
    new_config = copy.deepcopy(config)
    new_config.head_dim = head_dim
    if intermediate is not None:
        new_config.intermediate_size = intermediate
    if heads is not None:
        new_config.num_attention_heads = heads
        new_config.num_key_value_heads = new_kv
    return rebuild(model, new_config, state)


def rebuild(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``model``'s class built from ``config``, loaded with ``state``, on
    ``model``'s device and dtype."""
    ref = next(model.parameters())
    with torch.device(ref.device):
        new = type(model)(config)
    new = new.to(ref.dtype)
    new.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def structured_prune(model: nn.Module, step: PruneStep) -> nn.Module:
    config = _check_llama_like(model)
    width = config.intermediate_size
    n_heads = config.num_attention_heads
    keep_i = width - int(width * step.mlp_fraction) if step.mlp_fraction > 0 else None
    keep_h = n_heads - int(n_heads * step.heads_fraction) if step.heads_fraction > 0 else None
    if keep_h is not None and keep_h < 1:
        raise StepError("heads_fraction would remove every attention head")
    return shrink(model, intermediate=keep_i, heads=keep_h)


# --------------------------------------------------------------------------- the step


def recovery_options(step: PruneStep) -> TrainStep:
    """The fine-tune after pruning, as train options."""
    return TrainStep(
        max_steps=step.recover_steps,
        lr=step.lr,
        batch_size=step.batch_size,
        seed=step.seed,
        warmup_steps=0,
        schedule="constant",
        checkpoint_every=max(1, min(50, step.recover_steps)),
        log_every=max(1, min(10, step.recover_steps)),
    )


def run(ctx: StepContext, step: PruneStep, model: nn.Module) -> StepOutcome:
    from .modeling import count_params, nonzero_params
    from .train import train_loop

    params_before = count_params(model)
    masks: dict[str, torch.Tensor] | None = None
    if step.method == "magnitude":
        masks = magnitude_prune(model, step.sparsity)
    else:
        model = structured_prune(model, step)
    metrics: dict[str, Any] = {"method": step.method}
    extra: dict[str, Any] = {}
    if step.recover_steps > 0:
        after = (lambda m: apply_masks(m, masks)) if masks is not None else None
        result = train_loop(
            ctx,
            model,
            recovery_options(step),
            after_step=after,
            checkpoint_dir=ctx.step_dir() / "checkpoints",
        )
        model = result.model
        if masks is not None:
            apply_masks(model, masks)
        metrics["recover_steps"] = result.steps_done
        if result.losses:
            metrics["recover_loss"] = result.losses[-1][1]
        extra["losses"] = result.losses
    params_after, nonzero = count_params(model), nonzero_params(model)
    metrics.update(
        sparsity=linear_sparsity(model),  # over the prunable Linear weights
        model_sparsity=1.0 - nonzero / params_after,  # over every parameter, as evaluate has it
        params_before=params_before,
        params_after=params_after,
        nonzero_params=nonzero,
    )
    if step.method == "structured":
        cfg: Any = model.config
        metrics.update(
            intermediate_size=cfg.intermediate_size,
            attention_heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
        )
    return StepOutcome(model=model, metrics=metrics, extra=extra)
