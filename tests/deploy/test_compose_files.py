"""compose.yaml and the override `tandem compose` writes: schema-valid, and the merged
application model is what the docs promise (each GPU server on its own GPUs, self-registering
with the router, health-checked, started after the router is healthy)."""

from __future__ import annotations

import re

import jsonschema
import pytest
from deploy_helpers import (
    ROOT,
    active_services,
    flag_value,
    gpu_device_ids,
    interpolate,
    load_yaml,
    merge_compose,
    seconds,
    validate_compose,
    variables,
)

from tandem_cli.compose import main as compose_main

BASE = ROOT / "compose.yaml"
WORKER_ROLES = ("prefill", "decode")


def _role(name: str) -> str | None:
    return next((r for r in WORKER_ROLES if name == r or name.startswith(f"{r}-")), None)


@pytest.fixture
def override(tmp_path):
    """The override for 2 prefill + 2 decode servers, one GPU each, written beside a copy of
    compose.yaml (as `tandem compose` is meant to be run)."""
    base = tmp_path / "compose.yaml"
    base.write_text(BASE.read_text())
    compose_main(["--prefill", "2", "--decode", "2", "--gpus", "0-3", "--base", str(base)])
    return load_yaml(tmp_path / "compose.override.yaml")


def check_model(model: dict, expect_workers: dict[str, int]) -> dict[str, dict]:
    """Assertions every runnable model must pass; returns the active services."""
    services = active_services(model)
    names = set(services)
    assert {"certs", "router", "gateway"} <= names
    workers = {n: s for n, s in services.items() if _role(n)}
    for role, count in expect_workers.items():
        assert sum(_role(n) == role for n in workers) == count, sorted(workers)

    seen_gpus: dict[str, str] = {}
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, which is not started"
            # the one-shot certs service has finished; long-running ones are healthy
            expected = "service_completed_successfully" if dep == "certs" else "service_healthy"
            assert cond["condition"] == expected, (name, dep)
        if name == "certs":  # one-shot, checked in test_compose_security.py
            assert svc["restart"] == "no"
            continue
        # every service is health-checked through tandem_cli.healthcheck, with a start period
        hc = svc["healthcheck"]
        assert hc["test"][:4] == ["CMD", "python", "-m", "tandem_cli.healthcheck"], name
        assert seconds(hc["start_period"]) > 0
        if name not in workers:
            assert not gpu_device_ids(svc), f"{name} reserves GPUs"
            continue
        role = _role(name)
        cmd = svc["command"]
        assert cmd[0] == role
        # the probe asks the port the server listens on
        assert hc["test"][4] == f"127.0.0.1:{flag_value(cmd, '--port')}"
        assert seconds(hc["start_period"]) >= 300, "too short for loading a model"
        # self-registration: the router finds workers by their service name, not a static list
        assert flag_value(cmd, "--router") == "router:50051"
        assert flag_value(cmd, "--advertise-host") == name
        assert flag_value(cmd, "--host") == "0.0.0.0"
        assert svc["depends_on"]["router"]["condition"] == "service_healthy"
        assert svc["ipc"] == "host"
        # docker's stop timeout leaves the drain its whole bound
        drain = float(flag_value(cmd, "--drain-timeout"))
        assert seconds(svc["stop_grace_period"]) >= drain + 10
        ids = gpu_device_ids(svc)
        assert ids, f"{name} reserves no GPU"
        for gpu in ids:
            assert gpu not in seen_gpus, f"GPU {gpu} given to {seen_gpus[gpu]} and {name}"
            seen_gpus[gpu] = name
    # the router registers workers; it is given none by flag
    router_cmd = services["router"]["command"]
    assert not any(a.startswith(("--prefill", "--decode")) for a in router_cmd)
    assert flag_value(services["gateway"]["command"], "--router") == "router:50051"
    return services


def test_compose_yaml_follows_the_compose_spec():
    doc = load_yaml(BASE)
    validate_compose(doc)
    validate_compose(interpolate(doc))  # also once the defaults are filled in


def test_compose_yaml_alone_runs_one_prefill_and_one_decode_on_gpus_0_and_1():
    services = check_model(interpolate(load_yaml(BASE)), {"prefill": 1, "decode": 1})
    assert gpu_device_ids(services["prefill"]) == ["0"]
    assert gpu_device_ids(services["decode"]) == ["1"]
    assert services["gateway"]["ports"] == ["127.0.0.1:8000:8000"]


def test_every_setting_has_a_default_and_is_documented():
    doc = load_yaml(BASE)
    found = variables(doc)
    assert {"TANDEM_MODEL_DIR", "TANDEM_IMAGE", "TANDEM_PREFILL_GPU", "TANDEM_DECODE_GPU"} <= set(
        found
    )
    missing = sorted(n for n, d in found.items() if d is None)
    assert not missing, f"no default for {missing}"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    undocumented = sorted(n for n in found if f"`{n}`" not in docs)
    assert not undocumented, f"docs/deploy.md does not list {undocumented}"
    # a setting reaches every service that uses it: one prefill value is one decode value
    env = {"TANDEM_MAX_NUM_SEQS": "64", "TANDEM_PREFILL_GPU": "6", "TANDEM_DECODE_GPU": "7"}
    services = interpolate(doc, env)["services"]
    for role in WORKER_ROLES:
        assert flag_value(services[role]["command"], "--max-num-seqs") == "64"
    assert gpu_device_ids(services["prefill"]) == ["6"]
    assert gpu_device_ids(services["decode"]) == ["7"]


def test_generated_override_follows_the_compose_spec(override):
    validate_compose(override)
    validate_compose(interpolate(override))


def test_base_plus_override_pins_each_server_to_its_own_gpu(override):
    model = merge_compose(interpolate(load_yaml(BASE)), interpolate(override))
    validate_compose(model)
    services = check_model(model, {"prefill": 2, "decode": 2})
    pinned = {n: gpu_device_ids(s) for n, s in services.items() if _role(n)}
    assert pinned == {"prefill-0": ["0"], "prefill-1": ["1"], "decode-0": ["2"], "decode-1": ["3"]}
    # the base file's single-GPU workers are parked behind a profile, not started
    assert "prefill" not in services and "decode" not in services
    parked = active_services(model, ("single-pool",))
    assert {"prefill", "decode"} <= set(parked)


def test_override_replicas_inherit_the_base_worker_settings(override):
    base = interpolate(load_yaml(BASE))["services"]
    model = merge_compose(interpolate(load_yaml(BASE)), interpolate(override))
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        svc, src = model["services"][name], base[_role(name)]
        for key in ("image", "volumes", "healthcheck", "ipc", "stop_grace_period", "init",
                    "environment", "networks", "depends_on", "expose"):  # fmt: skip
            assert svc[key] == src[key], (name, key)
        # same command but for its own address
        expected = [a for a in src["command"] if not a.startswith("--advertise-host=")]
        got = [a for a in svc["command"] if not a.startswith("--advertise-host=")]
        assert got == expected


def test_override_uses_anchors_not_copies_per_replica(tmp_path):
    base = tmp_path / "compose.yaml"
    base.write_text(BASE.read_text())
    compose_main(["--prefill", "1", "--decode", "3", "--gpus", "0-3", "--base", str(base)])
    text = (tmp_path / "compose.override.yaml").read_text()
    assert text.count("&prefill") == 1 and text.count("&decode") == 1
    assert text.count("<<: *prefill") == 1 and text.count("<<: *decode") == 3
    assert len(re.findall(r"^\s+image:", text, re.M)) == 2  # only in the two templates


def test_schema_rejects_what_compose_would_reject():
    """The vendored schema is live: a typo in a service key fails validation."""
    doc = load_yaml(BASE)
    doc["services"]["decode"]["healthchek"] = doc["services"]["decode"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healthchek"):
        validate_compose(doc)
