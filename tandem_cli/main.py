"""`tandem serve | gateway | router | prefill | decode | bench | compose | certs`.

Imports stay lazy: `tandem router` and `tandem gateway` must never load torch.
"""

from __future__ import annotations

import argparse
import sys

from rpc.tls import tls_from_args


def main(argv: list[str] | None = None) -> None:
    # serve_flags, not serve: `tandem --version` and `tandem serve --help` load no engine
    from tandem_cli.serve_flags import VERSION, add_serve_args, check_serve_args

    parser = argparse.ArgumentParser(prog="tandem", description="tandem LLM inference server")
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="start the whole local stack (flags named like `vllm serve`'s)",
        description="The whole stack on this host: prefill and decode servers, router(s), "
        "gateway(s), supervised until Ctrl-C. Flags are named like `vllm serve`'s where they "
        "mean the same thing.",
    )
    add_serve_args(serve_parser)
    for name, text in (
        ("gateway", "OpenAI-compatible HTTP gateway (see `tandem gateway --help`)"),
        ("router", "public gRPC router (see `tandem router --help`)"),
        ("prefill", "prefill server (see `tandem prefill --help`)"),
        ("decode", "decode server (see `tandem decode --help`)"),
        ("bench", "serving benchmark against a running gateway (see `tandem bench --help`)"),
        ("compose", "write a compose override: N prefill / M decode servers on their own GPUs"),
        ("certs", "write a CA and one certificate per role for the internal plane's mutual TLS"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    # each service parses its own flags, so `tandem router` never imports worker code (torch)
    if command == "router":
        from router.server import main as router_main

        return router_main(argv[1:])
    if command == "gateway":
        from gateway.server import main as gateway_main

        return gateway_main(argv[1:])
    if command == "prefill":
        from prefill_service.server import main as prefill_main

        return prefill_main(argv[1:])
    if command == "decode":
        from decode_service.server import main as decode_main

        return decode_main(argv[1:])
    if command == "bench":
        from bench import main as bench_main

        sys.exit(bench_main(argv[1:]))
    if command == "certs":
        from tandem_cli.certs import main as certs_main

        return certs_main(argv[1:])
    if command == "compose":
        from tandem_cli.compose import main as compose_main

        return compose_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "serve":
        check_serve_args(args, serve_parser)
        tls = tls_from_args(args, serve_parser)
        from tandem_cli.serve import serve

        serve(args, tls)


if __name__ == "__main__":
    main()
