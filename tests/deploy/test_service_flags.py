"""Every command the deployment files run is accepted by the real `tandem` subcommand parsers,
so a renamed or misspelled flag fails here rather than in a container that restarts forever."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml
from deploy_helpers import ROOT, interpolate, load_yaml

from tandem_cli.compose import main as compose_main


def parser_for(command: str) -> argparse.ArgumentParser:
    # imported here: the worker parsers pull in the engine (torch)
    if command == "router":
        from router.server import add_cli_args
    elif command == "gateway":
        from gateway.server import add_cli_args
    elif command == "prefill":
        from prefill_service.server import add_cli_args
    elif command == "decode":
        from decode_service.server import add_cli_args
    else:
        raise AssertionError(f"unknown tandem subcommand {command!r}")

    class Strict(argparse.ArgumentParser):
        def error(self, message):
            raise AssertionError(f"tandem {command}: {message}")

    p = Strict(prog=f"tandem {command}")
    add_cli_args(p)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    return parser_for(argv[0]).parse_args(argv[1:])


def compose_commands(tmp_path) -> dict[str, list[str]]:
    base = tmp_path / "compose.yaml"
    base.write_text((ROOT / "compose.yaml").read_text())
    compose_main(["--prefill", "1", "--decode", "2", "--gpus", "0-3", "--base", str(base)])
    commands = {}
    for path in (base, base.with_name("compose.override.yaml")):
        for name, svc in interpolate(load_yaml(path))["services"].items():
            # `certs` writes files: test_compose_security.py runs it for real
            if "command" in svc and svc["command"][0] != "certs":
                commands[f"{path.name}:{name}"] = svc["command"]
    return commands


def k8s_commands() -> dict[str, list[str]]:
    """Container args of the k8s Deployments with $(VAR) expanded as the kubelet would."""
    base = ROOT / "deploy" / "k8s" / "base"
    config = dict(
        line.split("=", 1) for line in (base / "config.env").read_text().split("\n") if line
    )
    env = {**config, "POD_IP": "192.0.2.10"}
    commands = {}
    for path in sorted(base.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] != "Deployment":
                continue
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            commands[doc["metadata"]["name"]] = [
                re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]
            ]
    return commands


def test_compose_commands_parse(tmp_path):
    commands = compose_commands(tmp_path)
    assert len(commands) == 7  # router, gateway, prefill, decode, prefill-0, decode-0, decode-1
    for where, argv in commands.items():
        args = parse(argv)
        if argv[0] in ("prefill", "decode"):
            assert args.router == "router:50051", where
            assert args.drain_timeout == 30.0
            assert args.metrics_port == 9100
            assert args.model == "/model"


def test_k8s_commands_parse():
    commands = k8s_commands()
    assert set(commands) == {"tandem-router", "tandem-gateway", "tandem-prefill", "tandem-decode"}
    for name, argv in commands.items():
        args = parse(argv)
        if argv[0] in ("prefill", "decode"):
            assert args.router == "tandem-router:50051", name
            assert args.advertise_host == "192.0.2.10"
            assert args.drain_timeout == 30.0


def test_a_wrong_flag_is_caught():
    with pytest.raises(AssertionError, match="unrecognized arguments: --drain-timout=30"):
        parse(["decode", "--drain-timout=30"])
