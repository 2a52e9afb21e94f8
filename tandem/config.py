"""Frozen configs, built once (HF config converted here) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lose HF parity)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose from auto, {', '.join(_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, converted once from an HF config.json dict."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # items of the HF dict, hashable
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_scaling.get("rope_theta", 10000.0))
        if rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = {}
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rope_scaling=tuple(
                sorted((k, v) for k, v in rope_scaling.items() if not isinstance(v, (list, dict)))
            ),
            attention_bias=hf.get("attention_bias", arch.startswith("Qwen2")),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=window if arch.startswith(("Mistral", "Qwen")) and window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything a worker's engine needs; services build one from their flags."""

    model: str | None = None  # HF directory, .gguf file, or None for the default model
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda if available
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    kernel_backend: str = "auto"  # auto | torch | triton
    seed: int = 0  # for dummy weights and unseeded sampling
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # CUDA graphs for decode-only steps of up to this many sequences (0 or enforce_eager: off)
    cuda_graph_max_batch_size: int = 512
    enforce_eager: bool = False
    # launch step N+1 before step N's tokens reach the host (tandem/engine.py); None: on for
    # CUDA at tensor-parallel size 1, off otherwise
    async_scheduling: bool | None = None
    # CPU only: the KV pool lives in this file (a decode server's /dev/shm pool file), mapped
    # shared, so prefill servers on the host write it directly (the shm KV transport)
    kv_cache_file: str = ""
    # ranks the model is split over (one process each; rank 0 runs the engine, see tandem/tp)
    tensor_parallel_size: int = 1
    # largest top_logprobs a request may ask for (vLLM's --max-logprobs)
    max_logprobs: int = 20
    hf_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")

    def torch_device(self, tp_rank: int = 0) -> torch.device:
        """At tensor_parallel_size > 1 on CUDA, rank r uses GPU r (of CUDA_VISIBLE_DEVICES)."""
        if self.device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.device)
        if dev.type == "cuda" and self.tensor_parallel_size > 1:
            if torch.cuda.device_count() < self.tensor_parallel_size:
                raise ValueError(
                    f"tensor_parallel_size={self.tensor_parallel_size} needs that many GPUs;"
                    f" {torch.cuda.device_count()} visible"
                )
            dev = torch.device("cuda", tp_rank)
        return dev
