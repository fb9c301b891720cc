"""``quantize``: shrink the current model's weights.

============ ========================================== ========== ====================================
method       how                                        runs on    saved output loads with / serves on
============ ========================================== ========== ====================================
fp16, bf16   cast (rotary tables stay fp32)             any        any engine that reads a transformers
                                                                   checkpoint (transformers, vLLM, TGI)
int8-dynamic torchao Int8DynamicActivationInt8Weight:   cpu, cuda  ``AutoModelForCausalLM.from_pretrained``
             int8 per-row weights, int8 per-token                  with torchao installed, CPU or CUDA;
             activations                                           vLLM's torchao integration reads the
                                                                   same config.json (not checked here)
int8-weight  torchao Int8WeightOnly (per-row int8)      cpu, cuda  same as int8-dynamic
int4-weight  torchao Int4WeightOnly (tinygemm, bf16)    cuda sm80+ from_pretrained on CUDA (not checked on
                                                                   CPU: torchao has no CPU kernel for it)
gptq, rtn    optjob's GPTQ (calibrated, layer by layer) any        ``from_pretrained`` with torchao, CPU
             or round-to-nearest (``gptq``): group-wise            or CUDA: each matmul dequantizes the
             asymmetric int4/int8 codes, stored as                 weight. No engine with packed low-bit
             torchao IntxUnpackedToInt8Tensor (one code            kernels (vLLM, TGI, llama.cpp) reads
             per int8, a scale and zero point per group)           it without conversion
============ ========================================== ========== ====================================

gptq/rtn store the very codes, scales and zero points the algorithm chose (the int4 codes
one per byte: about a quarter of fp32 on disk, not an eighth), so the model measured after
the step is the model that reloads. Only the decoder layers' projections are quantized; the
embeddings and the output head stay in the float dtype (as in the GPTQ paper).
Why not llm-compressor / compressed-tensors: llm-compressor 0.14 would install beside torch
2.13 and transformers 5.17, but pins ``transformers<=5.17.0``, upgrades click and
huggingface_hub and brings datasets, pyarrow and auto-round. Its packed int4 format
(``compressed-tensors``, which vLLM serves with low-bit kernels) loads in transformers only
with the ``compressed-tensors`` package installed (not a dependency of optjob), and on CPU is
decompressed to float there. torchao is already the workload's dependency and runs on CPU.

Every output is an ordinary ``save_pretrained`` folder: the int methods save safetensors
whose int8/int4 tensors torchao flattens, and a ``quantization_config`` (transformers'
``TorchAoConfig``) in ``config.json``, so plain ``from_pretrained(folder)`` rebuilds the
same quantized model (same logits). The model in memory carries the transformers
quantizer that ``save_pretrained`` needs, as if it had been loaded quantized.

Dtypes: the int8 methods keep the checkpoint's float dtype (torchao's int8 tensors
compute in fp32, bf16 and fp16 alike, on CPU and CUDA), so a bf16 checkpoint stays
bf16 around its int8 weights; int4-weight casts to bf16 (its kernel's only dtype); the
casts cast. The metrics record the dtype before and after and every conversion made.

Structure: torchao quantizes ``nn.Linear``. gpt2's ``Conv1D`` model is first rewritten
as the same network in ``gpt_bigcode`` (``structure.gpt2_to_linear``: same weights,
same logits), which transformers reloads quantized. An output head tied to the input
embedding is left out (``modules_to_not_convert``), so the pair stays one tensor and the
quantized model is never larger, nor has more parameters, than its parent; an untied
head is quantized like any projection.

Folders written by optjob's earlier format (``optjob_quant.json`` + ``quantized_state.pt``)
still load through ``load_quantized``.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from optjob.specs import QuantizeStep
from optjob.specs.errors import StepError
from torch import nn

from . import calibration, families, gptq, structure
from .context import StepContext, StepOutcome

RECIPE_FILE = "optjob_quant.json"
STATE_FILE = "quantized_state.pt"
FORMAT_VERSION = 1
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
TORCHAO_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")
#: Group-wise asymmetric int4/int8 weights chosen by optjob (``gptq``), stored as torchao tensors.
GROUPWISE_METHODS = ("gptq", "rtn")
CPU_METHODS = ("fp16", "bf16", "int8-dynamic", "int8-weight")
#: What gptq and rtn outputs are, and what runs them (recorded in the step's metrics).
GROUPWISE_FORMAT = ("torchao IntxUnpackedToInt8Tensor: group-wise asymmetric int4/int8 codes held one per int8, "
                    "a scale and an int8 zero point per group")
GROUPWISE_SERVING = ("transformers + torchao (from_pretrained, CPU or CUDA; each matmul dequantizes the weight); "
                     "no engine with packed low-bit kernels (vLLM, TGI, llama.cpp) reads it without conversion")
#: torchao's int8 tensors run on these devices.
INT8_DEVICES = ("cpu", "cuda")


def preflight(step: QuantizeStep, device: torch.device) -> None:
    """Refuse a method the device cannot run, before any step runs."""
    if step.method == "int8-dynamic" and device.type not in INT8_DEVICES:
        raise StepError(
            f"int8-dynamic (torchao int8 activations and weights) runs on CPU and CUDA, and "
            f"this job runs on {device.type}; use int8-weight, fp16 or bf16"
        )
    if step.method != "int4-weight":
        return
    if device.type != "cuda":
        raise StepError(
            "int4-weight needs a CUDA GPU (torchao 0.18 has no CPU kernel for it); "
            "use int8-weight on CPU"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise StepError(
            f"int4-weight needs a GPU of compute capability 8.0 or newer (this one is "
            f"{major}.{minor}); use int8-weight"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization and torchao warn about deprecations on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torchao_config(method: str, group_size: int) -> Any:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if method == "int8-weight":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


def _config(model: nn.Module) -> Any:
    return model.config


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, rotary tables kept (see ``structure.cast_floats``)."""
    return structure.cast_floats(model, dtype)


def _params(model: nn.Module) -> int:
    """Parameters (a torchao tensor counts its logical elements; shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def _tied_head(model: nn.Module) -> list[str]:
    """Qualified names of the output head when it shares the input embedding's weight."""
    if not structure.is_tied(model):
        return []
    head = model.get_output_embeddings()  # type: ignore[operator]
    return [name for name, m in model.named_modules() if m is head]


def attach_quantizer(model: nn.Module, ao_config: Any, skipped: list[str]) -> None:
    """Give ``model`` the transformers quantizer a ``from_pretrained(quantization_config=
    TorchAoConfig(...))`` load would have given it: ``save_pretrained`` then writes the
    torchao safetensors and the ``quantization_config`` that load it back."""
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    quant_config = TorchAoConfig(ao_config, modules_to_not_convert=skipped or None)
    quantizer = TorchAoHfQuantizer(quant_config, pre_quantized=True)
    model.hf_quantizer = quantizer  # type: ignore[assignment]
    quantizer.postprocess_model(model)  # type: ignore[arg-type]


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = 128,
    device: torch.device | None = None,
    *,
    bits: int = 4,
    calibration_ids: torch.Tensor | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` (in place where it can; the result is returned) and record in
    ``model.optjob_quant`` what was done (``recipe``). ``bits`` and ``calibration_ids``
    (GPTQ's calibration windows) are for gptq and rtn."""
    model.eval()
    recipe = recipe_for(model, method, group_size, _float_dtype(model))
    conversions: list[str] = recipe["conversions"]
    if method in CASTS:
        before = _float_dtype(model)
        model = cast(model, CASTS[method])
        if before != CASTS[method]:
            conversions.append(f"{_dtype_name(before)} -> {_dtype_name(CASTS[method])}")
    elif method in TORCHAO_METHODS:
        model = _torchao_quantize(model, method, group_size, device, conversions)
    elif method in GROUPWISE_METHODS:
        if method == "gptq" and calibration_ids is None:
            raise StepError("gptq needs calibration windows")
        recipe["bits"] = bits
        model = _groupwise_quantize(
            model, bits, group_size, calibration_ids if method == "gptq" else None, device, on_layer, recipe
        )
    else:
        raise StepError(f"unknown quantization method {method!r}")
    recipe["float_dtype_after"] = _dtype_name(_float_dtype(model))
    model.optjob_quant = recipe  # type: ignore[assignment]
    return model


def _torchao_quantize(
    model: nn.Module, method: str, group_size: int, device: torch.device | None, conversions: list[str]
) -> nn.Module:
    from torchao.quantization import quantize_

    if structure.has_conv1d(model):
        model = structure.gpt2_to_linear(model)
        conversions.append("gpt2 Conv1D -> gpt_bigcode nn.Linear (same weights)")
    if device is not None:
        model.to(device)
    if method == "int4-weight" and _float_dtype(model) != torch.bfloat16:
        conversions.append(f"{_dtype_name(_float_dtype(model))} -> bfloat16 (int4 kernel)")
        cast(model, torch.bfloat16)
    skipped = _tied_head(model)
    if skipped:
        conversions.append(f"tied output head {skipped[0]} kept in {_dtype_name(_float_dtype(model))}")
    ao_config = _torchao_config(method, group_size)

    def wanted(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn not in skipped

    with _quiet():
        quantize_(model, ao_config, filter_fn=wanted)
    attach_quantizer(model, ao_config, skipped)
    return model


def _groupwise_quantize(
    model: nn.Module,
    bits: int,
    group_size: int,
    ids: torch.Tensor | None,
    device: torch.device | None,
    on_layer: Callable[[int, int], None] | None,
    recipe: dict[str, Any],
) -> nn.Module:
    """GPTQ (``ids`` given) or RTN over every decoder-layer projection (``gptq``), stored as
    torchao ``IntxUnpackedToInt8Tensor`` weights: the very codes, scales and zero points
    the algorithm chose (an exact round trip), which transformers saves and reloads."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    conversions: list[str] = recipe["conversions"]
    if structure.has_conv1d(model):
        model = structure.gpt2_to_linear(model)
        conversions.append("gpt2 Conv1D -> gpt_bigcode nn.Linear (same weights)")
    if device is not None:
        model.to(device)
    _, layers = structure.decoder_layers(model)
    for layer in layers:
        for name, module in calibration.projections(layer).items():
            if not isinstance(module, nn.Linear):
                raise StepError(f"{name} is a {type(module).__name__}: gptq and rtn store nn.Linear weights only")
    grids = gptq.quantize_model(model, ids, bits, group_size, device, on_layer)
    modules = dict(model.named_modules())
    offset = 2 ** (bits - 1)  # torchao keeps signed codes: [0, 2^bits) -> [-2^(bits-1), 2^(bits-1))
    err = ref = 0.0
    for name, q in grids.items():
        module = modules[name]
        assert isinstance(module, nn.Linear)
        dtype = module.weight.dtype
        err, ref = err + q.sq_error, ref + q.sq_norm
        tensor = IntxUnpackedToInt8Tensor(
            (q.codes - offset).to(torch.int8),
            q.scale.to(dtype),
            (q.zero - offset).to(torch.int8),
            getattr(torch, f"int{bits}"),
            (1, group_size),
            dtype,
            None,
        )
        module.weight = nn.Parameter(tensor, requires_grad=False)
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in grids]
    if skipped:
        conversions.append(f"kept in {_dtype_name(_float_dtype(model))}: {', '.join(skipped)}")
    recipe["quantized_layers"] = len(grids)
    recipe["weight_rel_error"] = (err / ref) ** 0.5 if ref else 0.0
    attach_quantizer(model, _intx_config(bits, group_size), skipped)
    return model


def _intx_config(bits: int, group_size: int) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerGroup(group_size),
        mapping_type=MappingType.ASYMMETRIC,
    )


class _Counter:
    """A write-only sink that counts bytes (torch.save without the copy)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: comparable across float and
    quantized models (packed int8 weights included)."""
    counter = _Counter()
    with _quiet():
        torch.save(model.state_dict(), counter)  # type: ignore[arg-type]
    return counter.n


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def recipe_for(model: nn.Module, method: str, group_size: int, float_dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT_VERSION,
        "method": method,
        "group_size": group_size,
        "model_class": type(model).__name__,
        "float_dtype": _dtype_name(float_dtype),
        "state_dict": STATE_FILE,
        "base_config": _config(model).to_dict(),
        "versions": {n: _version(n) for n in ("torch", "torchao", "transformers")},
        "conversions": [],
    }


# --------------------------------------------------------------------------- the earlier format


def save_quantized(model: nn.Module, path: Path, recipe: dict[str, Any]) -> None:
    """Write recipe + float config + quantized state dict into ``path`` (the earlier
    format; kept so such folders can be written again after ``load_quantized``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _config(model).save_pretrained(path)
    with _quiet():
        torch.save(model.state_dict(), path / STATE_FILE)
    (path / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))


def attach_saver(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    model.optjob_save = lambda d: save_quantized(model, Path(d), recipe)  # type: ignore[assignment]
    model.optjob_quant = recipe  # type: ignore[assignment]
    return model


def is_quantized_dir(path: Path) -> bool:
    """A folder of the earlier format (new quantized folders are plain checkpoints)."""
    return (Path(path) / RECIPE_FILE).exists()


def _legacy_quantize(model: nn.Module, method: str, group_size: int, device: torch.device) -> nn.Module:
    """Quantize as optjob did when it wrote the earlier format (torch dynamic int8 on
    every nn.Linear; torchao on every nn.Linear)."""
    if method == "int8-dynamic":
        with _quiet():
            return torch.ao.quantization.quantize_dynamic(
                model.to("cpu"), {nn.Linear}, dtype=torch.qint8, inplace=True
            )
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    model.to(device)
    if method == "int4-weight":
        model.to(torch.bfloat16)
        ao: Any = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    else:
        ao = Int8WeightOnlyConfig()
    with _quiet():
        quantize_(model, ao)
    return model


def load_quantized(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written in the earlier format by ``save_quantized``."""
    path = Path(path)
    recipe = json.loads((path / RECIPE_FILE).read_text())
    if recipe.get("format") != FORMAT_VERSION:
        raise StepError(f"{path}: unknown quantized-model format {recipe.get('format')!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, recipe["model_class"], None)
    if cls is None:
        cls = transformers.AutoModelForCausalLM.from_config
    model = cls(config)
    model.to(getattr(torch, recipe["float_dtype"]))
    device = torch.device(device)
    if recipe["method"] == "int8-dynamic":
        device = torch.device("cpu")
    model = _legacy_quantize(model, recipe["method"], recipe["group_size"], device)
    with _quiet():
        state = torch.load(path / recipe["state_dict"], map_location=device, weights_only=True)
    model.load_state_dict(state, assign=recipe["method"] != "int8-dynamic")
    model.eval()
    return attach_saver(model, recipe)


def run(ctx: StepContext, step: QuantizeStep, model: nn.Module) -> StepOutcome:
    families.check(_config(model), step)
    before = state_dict_bytes(model)
    params_before = _params(model)
    tied = structure.is_tied(model)
    extra: dict[str, Any] = {}
    if step.method in GROUPWISE_METHODS:
        bits = step.bits
        ids = calibration.step_windows(ctx, step) if step.method == "gptq" else None
        model = quantize_model(model, step.method, step.group_size, ctx.device, bits=bits,
                               calibration_ids=ids, on_layer=calibration.progress(ctx))
        extra = {"bits": bits, "group_size": step.group_size, "format": GROUPWISE_FORMAT,
                 "serving": GROUPWISE_SERVING}
        recipe_: dict[str, Any] = model.optjob_quant  # type: ignore[assignment]
        extra.update({k: recipe_[k] for k in ("quantized_layers", "weight_rel_error")})
        if ids is not None:
            extra.update(calibration_samples=int(ids.shape[0]), calibration_seq_len=int(ids.shape[1]))
    else:
        model = quantize_model(model, step.method, step.group_size, ctx.device)
    recipe: dict[str, Any] = model.optjob_quant  # type: ignore[assignment]
    after = state_dict_bytes(model)
    device = next(iter(model.state_dict().values())).device
    metrics = {
        **extra,
        "method": step.method,
        "size_bytes_before": before,
        "size_bytes_after": after,
        "size_ratio": after / before if before else None,
        "params_before": params_before,
        "params_after": _params(model),
        "float_dtype_before": recipe["float_dtype"],
        "float_dtype_after": recipe["float_dtype_after"],
        "tied_embeddings": tied,
        "conversions": recipe["conversions"],
        "model_type": families.model_type(_config(model)),
        "device": str(device),
    }
    for note in recipe["conversions"]:
        print(f"quantize: {note}", file=sys.stderr, flush=True)
    return StepOutcome(model=model, metrics=metrics)
