"""Build, load and save models; count their parameters and bytes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from optjob.specs import JobSpec
from optjob.specs.errors import StepError
from optjob.specs.model import FAMILIES, ModelInit, ModelSpec
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

QUANT_RECIPE = "optjob_quant.json"
#: Files of a saved model that are the tokenizer, not the model (left out of size_bytes).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
        "chat_template.jinja",
    }
)
_GPT2_ACT = {"silu": "silu", "gelu": "gelu_new", "relu": "relu"}


def init_config(init: ModelInit, vocab_size: int, **special: int | None) -> PretrainedConfig:
    """The transformers config for ``init`` (``special``: bos/eos/pad token ids)."""
    if init.family == "gpt2":
        kwargs: dict[str, Any] = dict(
            n_embd=init.hidden,
            n_layer=init.layers,
            n_head=init.heads,
            n_inner=init.mlp_width,
            n_positions=init.max_position,
            activation_function=_GPT2_ACT[init.activation],
            attn_pdrop=init.dropout,
            resid_pdrop=init.dropout,
            embd_pdrop=init.dropout,
        )
    else:  # llama, mistral, qwen2 share the Llama field names
        kwargs = dict(
            hidden_size=init.hidden,
            intermediate_size=init.mlp_width,
            num_hidden_layers=init.layers,
            num_attention_heads=init.heads,
            num_key_value_heads=init.kv_heads or init.heads,
            hidden_act=init.activation,
            max_position_embeddings=init.max_position,
            attention_dropout=init.dropout,
        )
        if init.family in ("mistral", "qwen2"):
            kwargs["sliding_window"] = None
    return AutoConfig.for_model(
        init.family,
        vocab_size=vocab_size,
        tie_word_embeddings=init.tie_embeddings,
        bos_token_id=special.get("bos_token_id"),
        eos_token_id=special.get("eos_token_id"),
        pad_token_id=special.get("pad_token_id"),
        **kwargs,
    )


def build_model(init: ModelInit, vocab_size: int, seed: int = 0, **special: int | None) -> PreTrainedModel:
    """A randomly initialised fp32 model; the same ``seed`` gives the same weights."""
    return build_from_config(init_config(init, vocab_size, **special), seed)


def build_from_config(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load_model(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """A model saved by ``save_model`` (or any ``save_pretrained`` folder; quantized
    ones carry their ``quantization_config`` and load the same way). A folder written by
    optjob's earlier quantized format (``optjob_quant.json``) is rebuilt by ``quantize``."""
    path = Path(path)
    if (path / QUANT_RECIPE).exists():
        from .quantize import load_quantized  # type: ignore[attr-defined]

        return load_quantized(path, device)  # type: ignore[no-any-return]
    if not (path / "config.json").exists():
        raise StepError(f"no model in {str(path)!r} (config.json is missing)")
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except Exception as exc:
        raise StepError(f"could not load the model in {str(path)!r}: {exc}") from None
    return model.to(device)


def load_hub_model(name: str, device: torch.device | str = "cpu", *, keep_dtype: bool = False) -> nn.Module:
    """A hub model: fp32 on a CPU; on a GPU in its checkpoint's dtype (an 8B model in bf16 is 16 GB
    where fp32 would not fit; training upcasts its master weights itself, ``train.to_master_weights``).
    ``keep_dtype``: in its checkpoint's dtype on a CPU too (the first training step says
    ``precision: checkpoint``)."""
    dtype: Any = "auto" if keep_dtype or torch.device(device).type == "cuda" else torch.float32
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as exc:
        raise StepError(f"could not load hub model {name!r} (needs network on the node): {exc}") from None
    return model.to(device)


def initial_model(spec: JobSpec, tokenizer: Any, device: torch.device | str = "cpu") -> nn.Module:
    """The model the pipeline starts from: built from ``model.init`` (seeded with the first
    train/distill step's seed), or loaded from the hub or a folder. Its vocabulary is
    grown to the tokenizer's when smaller."""
    m = spec.model
    if m.init is not None:
        seed = next((getattr(s, "seed", 0) for s in spec.pipeline if s.kind in ("train", "distill")), 0)
        special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model: nn.Module = build_model(m.init, len(tokenizer), seed, **special)
    elif m.hf is not None:
        first = next((s for s in spec.pipeline if s.kind in ("train", "distill")), None)
        model = load_hub_model(m.hf, device, keep_dtype=getattr(first, "precision", None) == "checkpoint")
    else:
        model = load_model(Path(str(m.path)))
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # type: ignore[operator]
    return model.to(device)


def model_family(m: ModelSpec) -> str:
    """The family of a hub or folder model (llama when it cannot be told, e.g. offline)."""
    try:
        if m.path is not None:
            kind = json.loads((Path(m.path) / "config.json").read_text()).get("model_type")
        else:
            kind = AutoConfig.from_pretrained(str(m.hf)).model_type
    except Exception:
        kind = None
    return kind if kind in FAMILIES else "llama"


def save_model(model: nn.Module, path: Path, tokenizer: Any = None) -> Path:
    """Save into a temporary folder beside ``path``, then swap it in, so ``path`` holds
    either the old model or the new one. Models that know better (quantized ones)
    save themselves through ``optjob_save(folder)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed mid-save
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        if hasattr(model, "optjob_save"):
            model.optjob_save(tmp)  # type: ignore[operator]
        elif isinstance(model, PreTrainedModel):
            _save_pretrained(model, tmp)
        else:
            raise StepError(f"cannot save a {type(model).__name__}: not a transformers model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_pretrained(model: PreTrainedModel, folder: Path) -> None:
    """``save_pretrained`` (safetensors). A model loaded quantized carries load-only weight
    converters (transformers 5.17's ``TorchAoDeserialize`` has no reverse, so saving it
    again raises NotImplementedError); they are left out while saving: the quantizer
    hands ``save_pretrained`` an already flattened state dict."""
    conversions: Any = getattr(model, "_weight_conversions", None)
    if conversions:
        reversible = []
        for conversion in conversions:
            try:
                conversion.reverse_transform()
            except NotImplementedError:
                continue
            reversible.append(conversion)
        model._weight_conversions = reversible  # type: ignore[assignment]
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if conversions:
            model._weight_conversions = conversions


def model_size_bytes(path: Path) -> int:
    """Bytes on disk of a saved model (weights, config, recipe; tokenizer files left out)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name not in TOKENIZER_FILES)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers in memory."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(_nbytes(t) for t in tensors) + sum(_nbytes(w) for w in _packed_weights(model))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(w.numel() for w in _packed_weights(model))


def nonzero_params(model: nn.Module) -> int:
    total = 0
    for p in [*model.parameters(), *_packed_weights(model)]:
        try:
            total += int(torch.count_nonzero(_plain(p)))
        except (RuntimeError, NotImplementedError, TypeError):
            total += p.numel()
    return total


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t``'s values (dequantized for quantized tensors)."""
    if getattr(t, "is_quantized", False):
        return t.dequantize()
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize"):
        return t.dequantize()  # torchao tensor subclasses
    return t.detach()


def _nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.numel() * t.element_size())
    except (RuntimeError, NotImplementedError, TypeError):
        return int(t.numel() * 4)


def _packed_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights that are not parameters: torch's dynamically quantized Linear keeps them packed."""
    out = []
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if callable(weight) and not isinstance(weight, torch.Tensor):
            try:
                w = weight()
            except (RuntimeError, TypeError):
                continue
            if isinstance(w, torch.Tensor):
                out.append(w)
    return out
