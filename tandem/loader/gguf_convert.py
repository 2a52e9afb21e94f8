"""GGUF (llama.cpp) -> an HF-format directory: config.json, model.safetensors, tokenizer files.

Tensors are dequantized with the `gguf` package. llama.cpp stores q/k projection rows
interleaved for its rotary layout; they are put back in HF's rotate-halves order here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        return f"model.layers.{idx}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_TOP_NAMES[base]}.{suffix}"


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp row order per head: (d/2 pairs, 2) interleaved; HF: (2 halves, d/2)
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_config(reader, arch: str, has_output: bool) -> dict:
    p = f"{arch}."
    num_heads = _field(reader, p + "attention.head_count")
    hidden = _field(reader, p + "embedding_length")
    cfg = {
        "architectures": [_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, p + "feed_forward_length"),
        "num_hidden_layers": _field(reader, p + "block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, p + "attention.head_count_kv", num_heads),
        "head_dim": _field(reader, p + "attention.key_length", hidden // num_heads),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, p + "context_length", 4096),
        "tie_word_embeddings": not has_output,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    if arch == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an HF directory for gguf_path into out_dir (atomically: a temp dir, then rename)."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}
    cfg = _hf_config(reader, arch, has_output="output.weight" in names)
    tensors = {}
    from tqdm import tqdm

    for t in tqdm(
        reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor", leave=False
    ):
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        kind = t.name.split(".")[-2]
        if arch == "llama" and kind == "attn_q":
            w = _unpermute(w, cfg["num_attention_heads"])
        elif arch == "llama" and kind == "attn_k":
            w = _unpermute(w, cfg["num_key_value_heads"])
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, copy=True))

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    if out_dir.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    log.info("converted gguf=%s out=%s", gguf_path, out_dir)
    return out_dir
