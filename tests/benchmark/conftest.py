import pytest

from tandem.loader.default_model import resolve_model_dir


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct dir (its tokenizer; the weights are never loaded here)."""
    return resolve_model_dir(None)
