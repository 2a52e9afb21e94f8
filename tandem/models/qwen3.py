"""Qwen3: the Llama layout with a per-head RMSNorm on q and k before rotary (cfg.qk_norm)."""

from tandem.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
