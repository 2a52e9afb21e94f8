"""The records the router shares with the core, once: sampling settings, a token's logprobs,
a request's token usage.

Torch-free and grpc-free: the router (which never imports torch) and the router client import
this module as the core does. Their wire forms (tandem.v1.SamplingParams, TokenLogprob, Usage)
are converted at the servicers (worker/convert.py, router/convert.py).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from tandem.validation import check_sampling

_GREEDY_EPS = 1e-5

# StructuredOutput.kind values, as vLLM's structured_outputs fields name them
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match, enforced with token masks (vLLM's StructuredOutputsParams).

    kind "json": spec is a JSON Schema as JSON text; "json_object": any JSON object (spec
    empty); "regex": a regular expression; "choice": one of `choices`; "grammar": EBNF/GBNF
    text; "structural_tag": an xgrammar structural tag as JSON text.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the compile cache's key)."""
        return (self.kind, self.spec, self.choices)


@dataclass
class SamplingParams:
    """Per-request sampling settings, mirroring vLLM's SamplingParams (the names users know)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k (the sampler applies only k > 0)
    min_p: float = 0.0
    seed: int | None = None  # per-request seed: same output whatever the batch
    presence_penalty: float = 0.0  # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL semantics, on prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (offline API / router)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: up to max_model_len (the router fills it in)
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token + top-k
    skip_special_tokens: bool = True
    # structured outputs: None is unconstrained
    structured: StructuredOutput | None = None
    # logprobs of the prompt's tokens (k alternatives per position); None: none
    prompt_logprobs: int | None = None
    # offline API (LLM.generate): n completions per prompt, the best n of best_of by
    # cumulative logprob (the router fans out n itself)
    n: int = 1
    best_of: int | None = None
    # False: the values are taken as given, unchecked. Only for a caller that checks them
    # itself (tandem/validation.py) before anything reads them: the router and the workers'
    # servicers, which check the wire's top_logprobs too and name the fields in their words.
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if check:
            check_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )


@dataclass(slots=True)
class Logprob:
    """One output token's logprob entry: sampled by a worker, streamed by the router."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k (token_id, logprob), best first
    # the token's rank in its distribution (1: the most likely) where computed (prompt
    # logprobs: vLLM's Logprob.rank); None elsewhere
    rank: int | None = None


@dataclass(slots=True)
class Usage:
    """A request's token counts (OpenAI's usage), for all its choices."""

    prompt_tokens: int  # once per request, whatever n
    completion_tokens: int  # summed over the choices
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (the first choice's)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
