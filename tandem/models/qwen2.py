"""Qwen2 / Qwen2.5: the Llama layout with a bias on the q/k/v projections (from the config)."""

from tandem.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
