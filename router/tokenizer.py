"""The model's tokenizer for the router: `tokenizers` + jinja2, never transformers/torch.

Reads an HF-format model dir: tokenizer.json, tokenizer_config.json (special tokens, and the
chat template unless chat_template.jinja holds it) and config.json (context length, EOS).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from router.chat_template import render_chat


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte <-> printable-char table used by ByteLevel BPE vocabularies; inverted to
    # recover a token's raw bytes (OpenAI logprobs return them, partial characters included).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


class RouterTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        model_cfg = _read_json(model_dir / "config.json")
        self.special_tokens = {
            k: t
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (t := _token_text(tok_cfg.get(k))) is not None
        }
        self.chat_template = _pick_template(tok_cfg.get("chat_template"), model_dir)
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True), 1)
        if isinstance(model_cfg.get("vocab_size"), int):
            self.vocab_size = max(self.vocab_size, model_cfg["vocab_size"])
        self.max_position_embeddings = model_cfg.get("max_position_embeddings")
        self.special_ids = {
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special
        }
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = self.tokenizer.token_to_id(eos) if eos else None
        self._byte_level = "ByteLevel" in type(self.tokenizer.decoder).__name__ or (
            "ByteLevel" in repr(self.tokenizer.decoder)
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> str:
        """HF's apply_chat_template(tokenize=False): tools in OpenAI's shape
        [{"type": "function", "function": {...}}]; template_kwargs become template variables."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use a text prompt")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            self.special_tokens,
            tools,
            **template_kwargs,
        )

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        """The vocabulary's strings of the tokens (HF's convert_ids_to_tokens: "Ġworld")."""
        return [self.tokenizer.id_to_token(t) or "" for t in token_ids]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per process; bounded)
    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, possibly a partial UTF-8 character."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and token_id not in self.special_ids:
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:
                pass
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _pick_template(value, model_dir: Path) -> str | None:
    # HF accepts a string or a list of named templates ("default", "tool_use", ...).
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value}
        value = named.get("default") or next(iter(named.values()), None)
    if value:
        return value
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else None
