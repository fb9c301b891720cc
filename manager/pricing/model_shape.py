"""A model's shape (hidden, layers, heads, vocab, dtype, ...) without its weights: from ``model.init``,
a local folder's ``config.json``, a table of well known hub models, or ``model.params`` alone. What
the memory and time estimates size a model by."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optjob.specs.model import ModelSpec
    from optjob.specs.steps import AdapterSpec

#: Assumed for an unknown hub model's vocabulary and checkpoint dtype.
ASSUMED_VOCAB = 32_000
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

# Architectures of well known hub models (lower-case ids), from their config.json on the hub:
# (hidden, layers, intermediate, heads, kv_heads, vocab, tied embeddings, family).
KNOWN_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool, str]] = {
    "meta-llama/llama-3.1-8b": (4096, 32, 14336, 32, 8, 128256, False, "llama"),
    "meta-llama/llama-3.1-8b-instruct": (4096, 32, 14336, 32, 8, 128256, False, "llama"),
    "meta-llama/meta-llama-3-8b": (4096, 32, 14336, 32, 8, 128256, False, "llama"),
    "meta-llama/llama-3.2-1b": (2048, 16, 8192, 32, 8, 128256, True, "llama"),
    "meta-llama/llama-3.2-3b": (3072, 28, 8192, 24, 8, 128256, True, "llama"),
    "mistralai/mistral-7b-v0.1": (4096, 32, 14336, 32, 8, 32000, False, "mistral"),
    "qwen/qwen2.5-0.5b": (896, 24, 4864, 14, 2, 151936, True, "qwen2"),
    "qwen/qwen2.5-1.5b": (1536, 28, 8960, 12, 2, 151936, True, "qwen2"),
    "qwen/qwen2.5-3b": (2048, 36, 11008, 16, 2, 151936, True, "qwen2"),
    "qwen/qwen2.5-7b": (3584, 28, 18944, 28, 4, 152064, False, "qwen2"),
    "tinyllama/tinyllama-1.1b-chat-v1.0": (2048, 22, 5632, 32, 4, 32000, False, "llama"),
    "huggingfacetb/smollm2-135m": (576, 30, 1536, 9, 3, 49152, True, "llama"),
    "huggingfacetb/smollm2-360m": (960, 32, 2560, 15, 5, 49152, True, "llama"),
    "huggingfacetb/smollm2-1.7b": (2048, 24, 8192, 32, 32, 49152, True, "llama"),
    "gpt2": (768, 12, 3072, 12, 12, 50257, True, "gpt2"),
    "openai-community/gpt2": (768, 12, 3072, 12, 12, 50257, True, "gpt2"),
}





@dataclass(frozen=True)
class Shape:
    """What memory depends on in a model."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    family: str = "llama"
    #: Bytes per weight of its checkpoint (what a GPU loads it in).
    dtype_bytes: float = 4.0

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_linear(self) -> int:
        """Linear weights of one block."""
        h, i = self.hidden, self.intermediate
        mlp = 2 * h * i if self.family == "gpt2" else 3 * h * i
        return 2 * h * h + 2 * h * self.kv_dim + mlp

    @property
    def linear_params(self) -> int:
        """Linear weights of the blocks (not the embeddings or the output head)."""
        return self.layers * self.layer_linear()

    @property
    def params(self) -> int:
        h = self.hidden
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.linear_params + self.layers * 2 * h + embeddings + h

    def lora_params(self, adapter: AdapterSpec) -> int:
        """Adapter weights: r x (in + out) per targeted Linear."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        sizes = {"q_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": 2 * h,
                 "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
        if self.family == "gpt2":
            sizes = {"c_attn": h + h + 2 * kv, "attn.c_proj": 2 * h, "c_fc": h + i, "mlp.c_proj": i + h}
        if adapter.targets == "all-linear":
            per_layer = sum(sizes.values())
        else:
            per_layer = sum(v for k, v in sizes.items() if any(k.endswith(t) or t.endswith(k) for t in adapter.targets))
        return adapter.r * per_layer * self.layers

    def lora_targets(self, adapter: AdapterSpec) -> int:
        if adapter.targets == "all-linear":
            return 4 if self.family == "gpt2" else 7
        return len(adapter.targets)


def shape_from_config(config: dict[str, Any]) -> Shape:
    """A ``Shape`` from a transformers ``config.json`` (Llama-style or gpt2 field names)."""

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            if config.get(name) is not None:
                return config[name]
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    family = str(config.get("model_type") or "llama")
    dtype = str(first("torch_dtype", "dtype", default="float32")).removeprefix("torch.")
    return Shape(
        hidden=hidden, layers=int(first("num_hidden_layers", "n_layer")),
        intermediate=int(first("intermediate_size", "n_inner", default=4 * hidden)), heads=heads,
        kv_heads=int(first("num_key_value_heads", default=heads)), vocab=int(first("vocab_size")),
        tied=bool(config.get("tie_word_embeddings", family == "gpt2")), family=family,
        dtype_bytes=_DTYPE_BYTES.get(dtype, 4),
    )


def config_shape(folder: str | Path) -> Shape | None:
    """The shape in a model folder's ``config.json``; None when there is none to read."""
    try:
        return shape_from_config(json.loads((Path(folder).expanduser() / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shape_from_params(params: int, vocab: int = ASSUMED_VOCAB) -> Shape:
    """A Llama-like shape with about ``params`` parameters: 128 wide per layer, MLP 3.5 x wider,
    heads 128 wide, 4 query heads per key/value head."""
    best = Shape(hidden=128, layers=1, intermediate=448, heads=1, kv_heads=1, vocab=vocab, dtype_bytes=2)
    for hidden in range(128, 65536 + 1, 128):
        heads = max(1, hidden // 128)
        kv = max(1, heads // 4)
        shape = Shape(hidden=hidden, layers=max(1, hidden // 128), intermediate=int(hidden * 3.5) // 128 * 128,
                      heads=heads, kv_heads=kv if heads % kv == 0 else heads, vocab=vocab, dtype_bytes=2)
        if shape.params > params:
            break
        best = shape
    return best


def model_shape(model: ModelSpec) -> tuple[Shape, str | None]:
    """The shape of the spec's starting model, and a note when it is a guess."""
    if model.init is not None:
        init = model.init
        return Shape(hidden=init.hidden, layers=init.layers, intermediate=init.mlp_width, heads=init.heads,
                     kv_heads=init.kv_heads or init.heads, vocab=init.vocab, tied=init.tie_embeddings,
                     family=init.family, dtype_bytes=4), None
    if model.path is not None:
        shape = config_shape(model.path)
        if shape is not None:
            return shape, None
    known = KNOWN_SHAPES.get((model.hf or "").lower())
    if known is not None:
        h, layers, i, heads, kv, vocab, tied, family = known
        return Shape(h, layers, i, heads, kv, vocab, tied, family, dtype_bytes=2), None
    what = model.hf or model.path
    if model.params is not None:
        return shape_from_params(model.params), (
            f"memory: the shape of {what} is assumed from model.params (Llama-like, vocab {ASSUMED_VOCAB}, bf16); "
            "give model.path with its config.json for an exact estimate")
    return shape_from_params(1_000_000_000), (
        f"memory: size of {what} unknown: assumed 1B parameters (set model.params)")


