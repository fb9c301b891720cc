"""``prune``: zero the smallest weights (magnitude) or cut whole MLP neurons and
attention heads out of the model (structured).

magnitude
    Global unstructured L1 over every projection weight (``nn.Linear`` and gpt2's
    ``Conv1D``) except the output head (``torch.nn.utils.prune.global_unstructured``).
    The masks are folded into the weights at once (``prune.remove``), kept aside, and
    re-applied after every optimizer step of the optional recovery fine-tune, so the
    model is always a plain transformers model: a checkpoint, the saved output and a
    reload see ``weight`` tensors, never ``weight_orig``/``weight_mask`` (which
    transformers would silently re-initialise on load).
structured
    Per layer, drop the least important MLP neurons (L2 norms of the gate and up rows
    times the down column; no gate: up and down) and attention heads (norm of the head's
    output-projection column block), then build a smaller model from an updated config
    (the MLP width field, ``num_attention_heads``, ``num_key_value_heads``, explicit
    ``head_dim``), so the result saves and reloads as an ordinary checkpoint. The
    projections are found by structure (``structure``): separate or fused q/k/v
    (phi3's ``qkv_proj``), gated, fused gate/up (phi3) or plain MLPs, Conv1D or Linear;
    grouped- and multi-query attention keep every key/value head. What cannot be cut is
    refused before any work, from the config (``families.check``) and then from the shapes.
wanda, sparsegpt
    One-shot pruning of every decoder-layer projection on calibration windows of the
    job's train split, layer by layer (``calibration``): Wanda scores ``|W| * ||X_j||``
    per output row (``wanda``), SparseGPT prunes and updates the remaining weights to
    reconstruct each layer's output (``sparsegpt``).

``pattern: "N:M"`` (e.g. 2:4) prunes N of every M consecutive input weights of each
output row, for magnitude, wanda and sparsegpt alike; its sparsity is N/M. The masks of
every unstructured method are kept through the recovery fine-tune.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from optjob.specs import PruneStep, TrainStep
from optjob.specs.errors import StepError
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import calibration, families, masks, sparsegpt, structure, wanda
from .context import StepContext, StepOutcome

# --------------------------------------------------------------------------- magnitude


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every projection (``nn.Linear`` or ``Conv1D``) except the output head (lm_head),
    by qualified name."""
    getter: Any = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if structure.is_projection(mod) and mod is not head and not name.endswith("lm_head")
    ]


def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-|w| prunable weights, globally.

    The masks are folded into the weights; they are returned (name -> bool tensor) so a
    fine-tune can keep the pruned weights at zero."""
    layers = prunable_linears(model)
    if not layers:
        raise StepError("magnitude pruning found no nn.Linear or Conv1D layers to prune")
    params = [(mod, "weight") for _, mod in layers]
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=sparsity
    )
    kept: dict[str, torch.Tensor] = {}
    for name, mod in layers:
        mask: Any = mod.weight_mask
        kept[name] = mask.detach().to(torch.bool).clone()
        torch_prune.remove(mod, "weight")
    return kept


@torch.no_grad()
def magnitude_nm(model: nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Zero the N smallest-|w| of every M consecutive inputs of each output row (``pattern``
    "N:M"), in every prunable projection; the masks (True: kept), as ``magnitude_prune``."""
    nm = masks.parse_pattern(pattern)
    assert nm is not None
    layers = prunable_linears(model)
    if not layers:
        raise StepError("magnitude pruning found no nn.Linear or Conv1D layers to prune")
    for name, mod in layers:
        masks.check_width(name, calibration.in_features(mod), nm[1])
    kept: dict[str, torch.Tensor] = {}
    for name, mod in layers:
        w = calibration.weight_of(mod)
        mask = masks.nm_mask(w.abs(), *nm)
        calibration.set_weight(mod, w.masked_fill(mask, 0))
        kept[name] = calibration.in_layout(mod, ~mask)
    return kept


@torch.no_grad()
def apply_masks(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (after an optimizer step moved them); ``kept``: name ->
    bool tensor, True where the weight is kept."""
    modules = dict(model.named_modules())
    for name, mask in kept.items():
        weight: Any = modules[name].weight
        weight.mul_(mask.to(weight.device))


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the prunable projections."""
    total = zeros = 0
    for _, mod in prunable_linears(model):
        weight: Any = mod.weight
        total += weight.numel()
        zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------- structured


def _head_dim(config: Any) -> int:
    value = families.head_dim(config)
    assert value is not None
    return value


def mlp_scores(mlp: Any) -> torch.Tensor:
    """Importance of each MLP neuron (``mlp``: a ``structure.Mlp`` or an MLP module)."""
    if not isinstance(mlp, structure.Mlp):
        mlp = structure.find_mlp(mlp)
    return structure.mlp_scores(mlp)


def head_scores(attn: Any, n_heads: int, head_dim: int) -> torch.Tensor:
    """Importance of each query head (``attn``: a ``structure.Attention`` or an attention
    module): norm of its block of output-projection columns."""
    if not isinstance(attn, structure.Attention):
        attn = structure.find_attention(attn)
    return structure.head_scores(attn, n_heads, head_dim)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def keep_heads(scores: torch.Tensor, n_kv: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, kv heads kept). MHA keeps any heads (with their k/v);
    GQA/MQA keeps every kv group and the same number of query heads in each."""
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


def _refuse(config: Any, problem: str, hint: str | None) -> StepError:
    family = families.model_type(config)
    return StepError(f"cannot cut {family} layers: {problem}", hint=hint)


def shrink(
    model: nn.Module,
    *,
    intermediate: int | None = None,
    heads: int | None = None,
    hint: str | None = "use method: magnitude",
) -> nn.Module:
    """A new, smaller model: each layer keeps its ``intermediate`` most important MLP
    neurons and ``heads`` most important query heads (None: unchanged). A model that
    cannot be cut so raises ``StepError`` with ``hint``."""
    config: Any = model.config
    layers = structure.blocks(model)
    n_heads = families.num_heads(config)
    n_kv = families.num_kv_heads(config)
    head_dim = families.head_dim(config)
    width_field = families.intermediate_field(config)
    width = families.intermediate_size(config)
    cut_mlp = intermediate is not None and intermediate != width
    cut_heads = heads is not None and heads != n_heads
    if cut_mlp:
        assert intermediate is not None
        problem = next((b.mlp.problem for b in layers if b.mlp.problem), None)
        if problem is None and (width_field is None or any(b.mlp.width != width for b in layers)):
            problem = "no config field gives the width of its MLP"
        if problem is not None:
            raise _refuse(config, problem, hint)
        assert width is not None
        if not 1 <= intermediate <= width:
            raise StepError(f"cannot keep {intermediate} of {width} MLP neurons", hint=hint)
    if cut_heads:
        assert heads is not None
        if not n_heads or not n_kv or not head_dim:
            raise _refuse(config, "its config gives no attention heads", hint)
        if not 1 <= heads <= n_heads:
            raise StepError(f"cannot keep {heads} of {n_heads} attention heads", hint=hint)
        problem = next(
            (p for b in layers if (p := structure.attention_problem(b.attention, n_heads, n_kv, head_dim))),
            None,
        )
        if problem is not None:
            raise _refuse(config, problem, hint)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    new_kv = n_kv
    for block in layers:
        if cut_mlp:
            structure.cut_mlp(state, block.mlp, _top(structure.mlp_scores(block.mlp), int(intermediate)))  # type: ignore[arg-type]
        if cut_heads:
            assert block.attention is not None and n_heads and n_kv and head_dim and heads
            scores = structure.head_scores(block.attention, n_heads, head_dim)
            q_keep, kv_keep = keep_heads(scores, n_kv, heads)
            new_kv = kv_keep.numel()
            structure.cut_heads(state, block.attention, q_keep, kv_keep, n_heads, n_kv, head_dim)
    new_config = copy.deepcopy(config)
    if cut_mlp:
        assert width_field is not None
        setattr(new_config, width_field, intermediate)
    if cut_heads:
        new_config.num_attention_heads = heads
        if hasattr(new_config, "num_key_value_heads"):
            new_config.num_key_value_heads = new_kv
        new_config.head_dim = head_dim
    mismatch = structure.shape_mismatch(model, new_config, state)
    if mismatch is not None:
        raise _refuse(config, f"a config with the new sizes builds other shapes ({mismatch})", hint)
    return rebuild(model, new_config, state)


def rebuild(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``model``'s class built from ``config``, loaded with ``state``, on
    ``model``'s device and dtype (non-persistent buffers such as rotary tables keep the
    dtype they are built in, as on a reload)."""
    ref = next(model.parameters())
    with torch.device(ref.device):
        new = type(model)(config)
    structure.cast_floats(new, ref.dtype)
    new.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def structured_prune(model: nn.Module, step: PruneStep) -> nn.Module:
    config: Any = model.config
    families.check(config, step)
    width = families.intermediate_size(config)
    n_heads = families.num_heads(config)
    keep_i = None
    if step.mlp_fraction > 0:
        if width is None:
            raise _refuse(config, "no config field gives the width of its MLP", "use method: magnitude")
        keep_i = width - int(width * step.mlp_fraction)
    keep_h = None
    if step.heads_fraction > 0:
        if not n_heads:
            raise _refuse(config, "its config gives no attention heads", "use method: magnitude")
        keep_h = families.heads_kept(n_heads, step.heads_fraction)
        if keep_h < 1:
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


# --------------------------------------------------------------------------- one-shot (wanda, sparsegpt)


def one_shot_prune(
    ctx: StepContext, step: PruneStep, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Wanda or SparseGPT over the decoder layers: (masks, what to record)."""
    ids = calibration.step_windows(ctx, step)
    pattern = step.pattern
    method = wanda if step.method == "wanda" else sparsegpt
    kept = method.prune_model(model, ids, step.sparsity, pattern, ctx.device, calibration.progress(ctx))
    return kept, {"calibration_samples": int(ids.shape[0]), "calibration_seq_len": int(ids.shape[1])}


def target_sparsity(step: PruneStep) -> float:
    """The sparsity a step asks for: N/M for an N:M pattern, else ``sparsity``."""
    nm = masks.parse_pattern(step.pattern)
    return nm[0] / nm[1] if nm is not None else float(step.sparsity)


def run(ctx: StepContext, step: PruneStep, model: nn.Module) -> StepOutcome:
    from .modeling import count_params, nonzero_params
    from .train import train_loop

    params_before = count_params(model)
    kept: dict[str, torch.Tensor] | None = None
    pattern = step.pattern
    metrics: dict[str, Any] = {"method": step.method}
    if step.method == "magnitude":
        kept = magnitude_prune(model, step.sparsity) if pattern == "unstructured" else magnitude_nm(model, pattern)
    elif step.method in ("wanda", "sparsegpt"):
        kept, recorded = one_shot_prune(ctx, step, model)
        metrics.update(recorded)
    else:
        model = structured_prune(model, step)
    if step.method != "structured":
        metrics.update(pattern=pattern, target_sparsity=target_sparsity(step))
    extra: dict[str, Any] = {}
    if step.recover_steps > 0:
        after = (lambda m: apply_masks(m, kept)) if kept is not None else None
        result = train_loop(
            ctx,
            model,
            recovery_options(step),
            after_step=after,
            checkpoint_dir=ctx.step_dir() / "checkpoints",
        )
        model = result.model
        if kept is not None:
            apply_masks(model, kept)
        metrics["recover_steps"] = result.steps_done
        if result.upcast is not None:
            metrics["upcast"] = result.upcast
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
            intermediate_size=families.intermediate_size(cfg),
            attention_heads=families.num_heads(cfg),
            kv_heads=families.num_kv_heads(cfg),
        )
    return StepOutcome(model=model, metrics=metrics, extra=extra)
