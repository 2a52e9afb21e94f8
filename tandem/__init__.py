"""tandem: an LLM inference server. The offline API is `from tandem import LLM, SamplingParams`."""

from tandem.records import SamplingParams, StructuredOutput

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code: load it only when asked for
    if name == "LLM":
        from tandem.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutput", "__version__"]
