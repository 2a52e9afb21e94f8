"""`tandem bench`: a serving benchmark client in the manner of `vllm bench serve`.

Streams requests through the OpenAI HTTP API of a running gateway and reports TTFT, TPOT, ITL,
E2EL, throughput and goodput. Never imports torch.
"""


def main(argv: list[str] | None = None) -> int:
    from bench.cli import main as cli_main

    return cli_main(argv)
