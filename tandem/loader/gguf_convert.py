"""GGUF (llama.cpp) -> an HF-format directory, through transformers' own GGUF support.

transformers reads the config and the tokenizer from the GGUF's metadata and maps, un-permutes
and dequantizes the tensors (with the `gguf` package); this module only writes what they return
as config.json, generation_config.json, tokenizer files and one bf16 model.safetensors.
bf16 halves the disk of an fp32 copy; the engine upcasts on load, so fp32 compute sees the same
numbers as HF loading the same directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_DTYPE = torch.bfloat16


def _hf_config(gguf_path: Path):
    """The HF config of the GGUF, with `architectures` named by transformers' own model class
    (a GGUF has no such field, and tandem picks its model class by that name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.device("meta"):  # only the class and parameter names, no memory
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    config.dtype = CACHE_DTYPE
    return config, model


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an HF directory for gguf_path into out_dir (atomically: a temp dir, then rename)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    log.info("event=gguf_converting path=%s dtype=bfloat16 out=%s", gguf_path, out_dir)
    config, meta_model = _hf_config(gguf_path)
    # shows its own progress bar per tensor, left on screen when done
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=meta_model, torch_dtype=CACHE_DTYPE
    )["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config.save_pretrained(str(tmp))
    GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    log.info(
        "event=gguf_converted path=%s out=%s tensors=%d bytes=%d seconds=%.1f",
        gguf_path,
        out_dir,
        len(tensors),
        size,
        time.perf_counter() - start,
    )
    return out_dir
