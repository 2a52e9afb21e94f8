"""The GGUF cache: one bf16 HF directory per file content, under TANDEM_CACHE, made once.

The default model's GGUF is converted once per test session (tests/conftest.py points
TANDEM_CACHE at a directory of this checkout); these tests check where the entry lives, what it
holds, that other copies of the same bytes reuse it, and that its tensors are the `gguf`
library's own dequantization of the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tandem.loader.default_model import (
    cache_root,
    content_digest,
    converted_dir_for,
    default_gguf_path,
    resolve_model_dir,
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(None)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under the cache's models/: a conversion changes it."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((root / "models").rglob("*"))
        if p.is_file()
    }


def test_entry_lives_under_tandem_cache(model_dir, tmp_path, monkeypatch):
    root = Path(os.environ["TANDEM_CACHE"])
    assert cache_root() == root
    assert model_dir.parent == root / "models"
    # the entry is named by the content hash, not by where the file lies
    assert model_dir.name.endswith("-" + content_digest(default_gguf_path())[:16])
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert converted_dir_for(default_gguf_path()).parent == tmp_path / "models"


def test_entry_holds_bf16_weights_and_the_routers_files(model_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert len(names) == 272  # 30 layers x 9 + embedding + final norm (lm_head tied)
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    # about 2 bytes a parameter (135M), not the 4 of an fp32 copy
    assert (model_dir / "model.safetensors").stat().st_size < 2.1 * 135e6


def test_same_bytes_at_another_path_reuse_the_entry(model_dir, tmp_path):
    root = cache_root()
    before = _snapshot(root)
    copy = tmp_path / "renamed-copy.gguf"
    shutil.copyfile(default_gguf_path(), copy)  # new path, name and mtime; same bytes
    assert resolve_model_dir(str(copy)) == model_dir
    assert resolve_model_dir(None) == model_dir  # a second load of the original
    assert _snapshot(root) == before  # nothing converted, written or replaced


def test_other_bytes_get_another_entry(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))  # leaves no digest memo behind
    changed = tmp_path / default_gguf_path().name
    shutil.copyfile(default_gguf_path(), changed)
    with changed.open("ab") as f:
        f.write(b"\0")  # trailing padding: still a GGUF, but other content
    assert content_digest(changed) != content_digest(default_gguf_path())
    assert converted_dir_for(changed).name != model_dir.name


def test_tensors_equal_the_gguf_librarys_dequantization(model_dir):
    """A few tensors against `gguf` read directly: equal after bf16 rounding. q/k rows are
    stored permuted for llama.cpp's rotary layout, so those compare as multisets of values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(default_gguf_path()))
    gguf_tensors = {t.name: t for t in reader.tensors}
    exact = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight",
        "blk.29.attn_norm.weight": "model.layers.29.input_layernorm.weight",
    }
    permuted = {"blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight"}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for gguf_name, hf_name in {**exact, **permuted}.items():
            t = gguf_tensors[gguf_name]
            ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            ref = ref.to(torch.bfloat16)
            ours = f.get_tensor(hf_name)
            assert ours.shape == ref.shape, hf_name
            if gguf_name in exact:
                assert torch.equal(ours, ref), hf_name
            else:
                assert not torch.equal(ours, ref)  # the un-permutation did happen
                assert torch.equal(ours.flatten().sort().values, ref.flatten().sort().values)
