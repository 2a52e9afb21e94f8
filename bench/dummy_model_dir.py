"""A model directory for serving benchmarks on dummy weights: a real architecture's config.json
plus a tokenizer whose vocabulary covers the whole model vocabulary.

No Llama-3 tokenizer is reachable from the GPU machine, so the router gets SmolLM2's byte-level
BPE tokenizer (carried, about 2 MB) with its vocabulary extended to the model's size by
entries that decode to " x<id>". Random prompt ids then detokenize through the real BPE path
for the first 49,152 ids and through one vocabulary lookup for the rest, so the router's
detokenization work stays close to a real tokenizer's. Weights are dummy (--load-format dummy).

    python bench/dummy_model_dir.py --config tandem/configs/llama-3.1-8b \
        --tokenizer-from .carry/smollm2-tokenizer --out /tmp/llama-8b-dummy
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def make_dummy_model_dir(config_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((config_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(config["vocab_size"]):
        if i not in taken:
            vocab[f"\u0120x{i}"] = i  # "\u0120" is the byte-level encoding of a space
    (out / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True, help="dir holding config.json")
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="dir of a BPE tokenizer")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    print(make_dummy_model_dir(a.config, a.tokenizer_from, a.out))


if __name__ == "__main__":
    main()
