"""Peak dense throughput per accelerator: the denominator of every duration estimate.

Figures are datasheet peaks for dense (no 2:4 sparsity) matrix math, in TFLOP/s per device: one
GPU, or one TPU slice as SkyPilot names it (``tpu-v5litepod-8`` = 8 chips). Real training reaches a
fraction of this (the estimator's ``efficiency``; calibration measures it per accelerator).

``bf16`` is the tensor-core bf16/fp16 figure. ``fp32`` is the plain FP32 (CUDA core) figure,
because PyTorch runs fp32 matmuls without TF32 unless a program opts in. On TPUs, XLA's default
matmul precision runs fp32 as one bf16 pass, so fp32 = bf16 there.

Also here: each GPU's memory (``GPU_MEMORY_GIB``, what ``pricing.memory`` checks a plan against) and
the sizes of well known hub models, for planning without a download.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A node without accelerators: ~0.5 TFLOP/s fp32, what PyTorch sustains on a recent 8-core
#: laptop/desktop CPU (AVX2/AVX-512 FMA, before memory-bandwidth limits). Calibration replaces it.
CPU_TFLOPS = 0.5
#: Used, with a note, for an accelerator this table does not know.
UNKNOWN_TFLOPS = 100.0


@dataclass(frozen=True)
class Peak:
    bf16: float
    fp32: float
    source: str


GPU_PEAKS: dict[str, Peak] = {
    # NVIDIA T4 datasheet: 65 TFLOPS mixed-precision (FP16/FP32) tensor, 8.1 TFLOPS FP32.
    "T4": Peak(65, 8.1, "NVIDIA T4 Tensor Core GPU datasheet"),
    # NVIDIA L4 datasheet: 242 TFLOPS BF16 with sparsity -> 121 dense; 30.3 FP32.
    "L4": Peak(121, 30.3, "NVIDIA L4 datasheet (242 sparse / 2)"),
    # AWS's A10G runs lower clocks than the A10 (125 dense BF16); ~70 dense BF16 is the figure
    # measured and commonly used for g5 instances; 31.2 FP32 (A10 datasheet, as an upper bound).
    "A10G": Peak(70, 31.2, "A10 datasheet scaled to A10G clocks (~70 dense bf16)"),
    # NVIDIA A10 datasheet: 250 TFLOPS BF16 sparse -> 125 dense; 31.2 FP32.
    "A10": Peak(125, 31.2, "NVIDIA A10 datasheet (250 sparse / 2)"),
    # NVIDIA V100 (SXM2) datasheet: 125 TFLOPS tensor (fp16; no bf16 support), 15.7 FP32.
    "V100": Peak(125, 15.7, "NVIDIA V100 datasheet (fp16 tensor)"),
    "V100-32GB": Peak(125, 15.7, "NVIDIA V100 datasheet (fp16 tensor)"),
    # NVIDIA A100 datasheet: 312 TFLOPS BF16 dense (624 sparse), 19.5 FP32; same for 40/80 GB.
    "A100": Peak(312, 19.5, "NVIDIA A100 datasheet"),
    "A100-80GB": Peak(312, 19.5, "NVIDIA A100 datasheet"),
    # NVIDIA H100 SXM datasheet: 1979 TFLOPS BF16 with sparsity -> 989 dense; 67 FP32.
    # (The catalog names PCIe H100s "H100" too; those peak at 756 dense: an overestimate there.)
    "H100": Peak(989, 67, "NVIDIA H100 SXM datasheet (1979 sparse / 2)"),
    "H100-MEGA": Peak(989, 67, "NVIDIA H100 SXM datasheet (1979 sparse / 2)"),
    # NVIDIA H200 datasheet: same tensor cores as H100 SXM, 989 dense BF16, 67 FP32.
    "H200": Peak(989, 67, "NVIDIA H200 datasheet (1979 sparse / 2)"),
    # NVIDIA GH200: an H100/H200-class GPU: 989 dense BF16, 67 FP32.
    "GH200": Peak(989, 67, "NVIDIA GH200 datasheet (1979 sparse / 2)"),
    # NVIDIA HGX B200: 4.5 PFLOPS dense FP16/BF16 per GPU is the sparse figure -> 2.25 dense;
    # FP32 600 TFLOPS per 8-GPU board -> 75 per GPU.
    "B200": Peak(2250, 75, "NVIDIA HGX B200 datasheet (4.5 PF sparse / 2)"),
    # NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor with sparsity -> 154.8 dense; 38.7 FP32.
    "A6000": Peak(154.8, 38.7, "NVIDIA RTX A6000 datasheet (309.7 sparse / 2)"),
    # NVIDIA Quadro RTX 6000 (Turing): 130.5 TFLOPS fp16 tensor, 16.3 FP32.
    "RTX6000": Peak(130.5, 16.3, "NVIDIA Quadro RTX 6000 datasheet"),
    # Pascal/Kepler, no tensor cores: P100 18.7 FP16 / 9.3 FP32; P4 5.5 FP32; K80 board 8.73 FP32
    # boost for 2 GPUs -> ~4.4 per GPU.
    "P100": Peak(18.7, 9.3, "NVIDIA Tesla P100 datasheet"),
    "P4": Peak(5.5, 5.5, "NVIDIA Tesla P4 datasheet"),
    "K80": Peak(4.4, 4.4, "NVIDIA Tesla K80 datasheet (8.73 per 2-GPU board)"),
}

# TPU peak bf16 TFLOP/s per chip (Google Cloud TPU system architecture pages), and whether the
# slice suffix counts TensorCores (v2, v3, v4, v5p: 2 cores per chip) or chips (v5e, v6e).
TPU_CHIPS: dict[str, tuple[float, int, str]] = {
    "v2": (45, 2, "cloud.google.com/tpu/docs/v2: 45 TFLOPS per chip (180 per v2-8)"),
    "v3": (123, 2, "cloud.google.com/tpu/docs/v3: 123 TFLOPS per chip"),
    "v4": (275, 2, "cloud.google.com/tpu/docs/v4: 275 TFLOPS per chip"),
    "v5p": (459, 2, "cloud.google.com/tpu/docs/v5p: 459 TFLOPS per chip"),
    "v5litepod": (197, 1, "cloud.google.com/tpu/docs/v5e: 197 TFLOPS per chip"),
    "v5e": (197, 1, "cloud.google.com/tpu/docs/v5e: 197 TFLOPS per chip"),
    "v6e": (918, 1, "cloud.google.com/tpu/docs/v6e: 918 TFLOPS per chip"),
}


#: Memory of one GPU in GiB: the total ``nvidia-smi`` reports (what CUDA can allocate, before its own
#: context), from NVIDIA's datasheets ("24 GB" GDDR6 on A10G/L4/A10 reads 23028 MiB; "80 GB" HBM reads
#: 80 GiB on A100 and 79.6 GiB on H100). The plan drops offers whose GPUs cannot hold a step.
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 15.0,  # 16 GB GDDR6 (15360 MiB)
    "L4": 22.5,  # 24 GB GDDR6 (23034 MiB)
    "A10G": 22.35,  # 24 GB GDDR6 (22888 MiB on AWS g5, as its catalog says)
    "A10": 22.5,  # 24 GB GDDR6
    "V100": 15.8,  # 16 GB HBM2 (16160 MiB)
    "V100-32GB": 31.7,  # 32 GB HBM2 (32510 MiB)
    "A100": 40.0,  # 40 GB HBM2 (40960 MiB)
    "A100-80GB": 80.0,  # 80 GB HBM2e (81920 MiB)
    "H100": 79.6,  # 80 GB HBM3 (81559 MiB)
    "H100-MEGA": 79.6,
    "H200": 140.4,  # 141 GB HBM3e (143771 MiB)
    "GH200": 95.6,  # 96 GB HBM3 (97871 MiB)
    "B200": 179.1,  # 180 GB HBM3e per GPU of an HGX B200 (183359 MiB)
    "A6000": 48.0,  # 48 GB GDDR6 (49140 MiB)
    "RTX6000": 23.7,  # Quadro RTX 6000, 24 GB GDDR6 (24220 MiB)
    "L40S": 45.0,  # 48 GB GDDR6 (46068 MiB)
    "L40": 45.0,
    "P100": 15.9,  # 16 GB HBM2 (16280 MiB)
    "P4": 7.4,  # 8 GB GDDR5 (7611 MiB)
    "K80": 11.2,  # 12 GB GDDR5 per GPU of the 2-GPU board (11441 MiB)
}


def gpu_memory_gib(name: str | None) -> float | None:
    """Memory of one GPU named as the catalog names it; None for a CPU node, a TPU or an unknown name."""
    if name is None:
        return None
    folded = {k.lower(): v for k, v in GPU_MEMORY_GIB.items()}
    return folded.get(name.lower())


def tpu_chips(name: str) -> tuple[str, int] | None:
    """``tpu-v5litepod-8`` -> ("v5litepod", 8); ``tpu-v4-8`` -> ("v4", 4); None if not a TPU."""
    parts = name.lower().split("-")
    if len(parts) != 3 or parts[0] != "tpu" or parts[1] not in TPU_CHIPS or not parts[2].isdigit():
        return None
    version = parts[1]
    return version, max(1, int(parts[2]) // TPU_CHIPS[version][1])


def _gpu(name: str) -> Peak | None:
    folded = {k.lower(): v for k, v in GPU_PEAKS.items()}
    return folded.get(name.lower())


def known(name: str | None) -> bool:
    """Whether the table has a figure for ``name`` (None and "cpu" mean a CPU node)."""
    if name is None or name.lower() == "cpu":
        return True
    return _gpu(name) is not None or tpu_chips(name) is not None


def peak_tflops(name: str | None, precision: str = "bf16") -> float:
    """Peak TFLOP/s of ONE device named as the catalog names it (a GPU, or a whole TPU slice).
    ``None``/``"cpu"``: a CPU-only node. Unknown names: :data:`UNKNOWN_TFLOPS` (see ``known``)."""
    if name is None or name.lower() == "cpu":
        return CPU_TFLOPS
    tpu = tpu_chips(name)
    if tpu is not None:
        return TPU_CHIPS[tpu[0]][0] * tpu[1]
    peak = _gpu(name)
    if peak is None:
        return UNKNOWN_TFLOPS
    return peak.fp32 if precision == "fp32" else peak.bf16


def node_peak_flops(name: str | None, count: int, precision: str = "bf16") -> float:
    """FLOP/s of one node: ``count`` devices (a CPU node counts as one)."""
    return peak_tflops(name, precision) * 1e12 * (max(count, 1) if name else 1)


def normalize(name: str) -> str:
    """Name for matching: case-folded; ``tpu-v5e-N`` spelled as the catalog does (v5litepod)."""
    lowered = name.lower()
    if lowered.startswith("tpu-v5e-"):
        return "tpu-v5litepod-" + lowered[len("tpu-v5e-"):]
    return lowered


# -- model sizes -----------------------------------------------------------------------------

#: Well known hub ids (lower case) -> (parameters, layers), from the model cards / config.json
#: on the Hugging Face hub (parameter counts include embeddings).
KNOWN_MODELS: dict[str, tuple[int, int]] = {
    "qwen/qwen2.5-0.5b": (494_000_000, 24),
    "qwen/qwen2.5-1.5b": (1_540_000_000, 28),
    "qwen/qwen2.5-3b": (3_090_000_000, 36),
    "qwen/qwen2.5-7b": (7_620_000_000, 28),
    "meta-llama/llama-3.2-1b": (1_240_000_000, 16),
    "meta-llama/llama-3.2-3b": (3_210_000_000, 28),
    "meta-llama/llama-3.1-8b": (8_030_000_000, 32),
    "mistralai/mistral-7b-v0.1": (7_240_000_000, 32),
    "tinyllama/tinyllama-1.1b-chat-v1.0": (1_100_000_000, 22),
    "huggingfacetb/smollm2-135m": (135_000_000, 30),
    "huggingfacetb/smollm2-360m": (362_000_000, 32),
    "huggingfacetb/smollm2-1.7b": (1_710_000_000, 24),
    "gpt2": (124_000_000, 12),
    "openai-community/gpt2": (124_000_000, 12),
    "eleutherai/pythia-160m": (162_000_000, 12),
    "facebook/opt-125m": (125_000_000, 12),
}
