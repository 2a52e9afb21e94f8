"""deploy/k8s: every kustomization renders with `kubectl kustomize`, every object validates
against the Kubernetes JSON schemas (strict: unknown fields fail), and the rendered objects fit
together: probes, drain bound, GPUs, Services, HPAs, the prometheus-adapter rule, mutual TLS
with a Secret per role, and NetworkPolicies that admit only the callers each component needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/autoscale"]
# the oldest release whose schema has every field used (preStop `sleep`: 1.30) and the newest
# schema kubernetes-validate bundles
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
WORKERS = {"tandem-prefill": 50100, "tandem-decode": 50200}
HPA_METRICS = {"vllm_num_requests_waiting", "vllm_kv_cache_usage_perc"}


def kubectl() -> str:
    # the machine image (CI's too) has kubectl with kustomize built in; KUBECTL may point at
    # another. Not finding it is a failure, not a skip: rendering is what this file checks.
    path = os.environ.get("KUBECTL") or shutil.which("kubectl")
    assert path, "kubectl not found (set KUBECTL); the Kubernetes manifests cannot be rendered"
    return path


def render(kustomization: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},  # rendering needs no cluster
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> dict[tuple[str, str], dict]:
    docs = render(request.param)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objects) == len(docs), "two objects share a kind and name"
    return objects


def by_kind(objects, kind: str) -> dict[str, dict]:
    return {name: obj for (k, name), obj in objects.items() if k == kind}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def flag(c: dict, name: str) -> str | None:
    for arg in c["args"]:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, version):
    for (kind, name), obj in rendered.items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{kind}/{name} against {version}: {path}: {e.message}")


def test_schema_validation_is_live(rendered):
    """A misspelled field in a rendered Deployment fails strict validation."""
    dep = yaml.safe_load(yaml.safe_dump(by_kind(rendered, "Deployment")["tandem-decode"]))
    container(dep)["readinesProbe"] = container(dep).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_separate_deployments_and_services(rendered):
    deployments = by_kind(rendered, "Deployment")
    assert set(deployments) == {"tandem-router", "tandem-gateway", *WORKERS}
    assert set(by_kind(rendered, "Service")) == {"tandem-router", "tandem-gateway"}
    for svc in by_kind(rendered, "Service").values():
        labels = deployments[svc["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for p in container(deployments[svc["metadata"]["name"]])["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    # one router: the registry of self-registered workers lives in its memory
    assert deployments["tandem-router"]["spec"]["replicas"] == 1
    assert deployments["tandem-router"]["spec"]["strategy"]["type"] == "Recreate"


def grpc_probe_port(probe: dict) -> int:
    """The port a probe asks grpc.health.v1: `python -m tandem_cli.healthcheck 127.0.0.1:PORT`,
    which reads the TANDEM_TLS_* settings. Not the kubelet's own grpc probe: it speaks
    plaintext, which a mutual-TLS server refuses."""
    assert "grpc" not in probe, "the kubelet's grpc probe cannot present a certificate"
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "-m", "tandem_cli.healthcheck"], command
    host, port = command[3].rsplit(":", 1)
    assert host == "127.0.0.1"
    return int(port)


def test_probes_are_grpc_health_for_grpc_servers_and_http_for_the_gateway(rendered):
    deployments = by_kind(rendered, "Deployment")
    for name, dep in deployments.items():
        c = container(dep)
        for probe in ("readinessProbe", "livenessProbe"):
            if name == "tandem-gateway":
                # readiness follows the router; liveness only the gateway process
                want = "/ready" if probe == "readinessProbe" else "/live"
                assert c[probe]["httpGet"]["path"] == want
            else:
                assert grpc_probe_port(c[probe]) == int(flag(c, "port")), (name, probe)
    for name in WORKERS:
        startup = container(deployments[name])["startupProbe"]
        assert grpc_probe_port(startup) == WORKERS[name]
        # model loading gets at least 5 minutes before liveness may restart the pod
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_workers_self_register_drain_within_the_grace_period_and_hold_a_gpu(rendered):
    (config,) = by_kind(rendered, "ConfigMap").values()
    drain = float(config["data"]["TANDEM_DRAIN_TIMEOUT"])
    for name, dep in by_kind(rendered, "Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        c = container(dep)
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in c["envFrom"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        if name not in WORKERS:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
            pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert spec["terminationGracePeriodSeconds"] > pre_stop
            continue
        assert flag(c, "router") == "tandem-router:50051"
        assert flag(c, "advertise-host") == "$(POD_IP)"
        pod_ip = next(e for e in c["env"] if e["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert flag(c, "drain-timeout") == "$(TANDEM_DRAIN_TIMEOUT)"
        # SIGTERM drains for up to TANDEM_DRAIN_TIMEOUT; the kubelet waits longer than that
        assert spec["terminationGracePeriodSeconds"] >= drain + 10
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert flag(c, "metrics-port") == "9100"
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9100"
        # every $(VAR) an argument uses is defined for the container
        defined = set(config["data"]) | {e["name"] for e in c.get("env", [])}
        used = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
        assert used <= defined, used - defined


def test_autoscale_overlay_has_an_hpa_per_pool_on_adapter_metrics(rendered):
    hpas = by_kind(rendered, "HorizontalPodAutoscaler")
    deployments = by_kind(rendered, "Deployment")
    if not hpas:  # the base: fixed pool sizes
        assert all(deployments[n]["spec"]["replicas"] >= 1 for n in WORKERS)
        return
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(WORKERS)
    for hpa in hpas.values():
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "a fixed replicas would fight the HPA"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] in HPA_METRICS
            assert metric["pods"]["target"]["type"] == "AverageValue"


def test_prometheus_adapter_rule_serves_the_metrics_the_hpas_use():
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    served = set()
    for series in re.findall(r"vllm:\w+", rule["seriesQuery"]):
        served.add(
            re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
        )
    hpa_metrics = set()
    for path in (K8S / "overlays" / "autoscale").glob("hpa-*.yaml"):
        hpa = yaml.safe_load(path.read_text())
        hpa_metrics |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert hpa_metrics <= served
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_every_component_runs_mutual_tls_with_its_own_role_secret(rendered):
    (config,) = by_kind(rendered, "ConfigMap").values()
    tls = {k: v for k, v in config["data"].items() if k.startswith("TANDEM_TLS_")}
    assert tls["TANDEM_TLS_REQUIRE_CLIENT_CERT"] == "1"
    # a fixed server name would replace the clients' check of the peer's role
    assert "TANDEM_TLS_SERVER_NAME" not in tls
    for name, dep in by_kind(rendered, "Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        component = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        # each pod holds its own role's certificate, never another role's
        assert volume["secret"]["secretName"] == f"tandem-{component}-tls", name
        # the key is readable by the pod's group only, which the non-root user is in
        assert volume["secret"]["defaultMode"] == 0o440
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
        (mount,) = [m for m in container(dep)["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        for key in ("CERTFILE", "KEYFILE", "CA_CERTS"):
            assert tls[f"TANDEM_TLS_{key}"].startswith(mount["mountPath"] + "/"), (name, key)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name != "tandem-gateway" and probe in container(dep):
                # the exec probe starts python: more than the default 1 s timeout
                assert container(dep)[probe]["timeoutSeconds"] >= 5


# -- NetworkPolicy: what a CNI that enforces it would admit ----------------------------------

NAMESPACE = {"kubernetes.io/metadata.name": "tandem"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
COMPONENTS = ("gateway", "router", "prefill", "decode")


def _pod(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": component}


# name -> (namespace labels, pod labels) of a pod that might open a connection
SOURCES = {
    **{c: (NAMESPACE, _pod(c)) for c in COMPONENTS},
    "prometheus": (MONITORING, {"app.kubernetes.io/name": "prometheus"}),
    "other pod, same namespace": (NAMESPACE, {"app": "debug-shell"}),
    "other namespace": ({"kubernetes.io/metadata.name": "default"}, {"app": "web"}),
    "monitoring, not prometheus": (MONITORING, {"app.kubernetes.io/name": "grafana"}),
}
EVERYONE = frozenset(SOURCES)
# (component, container port name) -> who may connect: the whole access matrix
EXPECTED = {
    ("gateway", "http"): EVERYONE,
    ("router", "grpc"): frozenset({"gateway", "prefill", "decode"}),
    ("router", "metrics"): frozenset({"prometheus"}),
    ("prefill", "grpc"): frozenset({"router"}),
    ("prefill", "metrics"): frozenset({"prometheus"}),
    ("decode", "grpc"): frozenset({"router", "prefill"}),  # Decode.*; KVTransfer from prefill
    ("decode", "metrics"): frozenset({"prometheus"}),
}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unhandled selector {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, source: tuple[dict, dict]) -> bool:
    ns_labels, pod_labels = source
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"unhandled peer {peer}"
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], ns_labels)
    else:  # a podSelector alone means pods of the policy's own namespace
        ns_ok = ns_labels == NAMESPACE
    return ns_ok and _selects(peer.get("podSelector", {}), pod_labels)


def admits(policies: list[dict], target: dict[str, str], port: str, source) -> bool:
    """NetworkPolicy semantics: a pod selected by any Ingress policy takes only what one of
    those policies' rules allows (rules and policies add up; an empty list admits nothing)."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target)]
    assert all("Ingress" in p["spec"]["policyTypes"] for p in selecting)
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_admits(peer, source) for peer in peers):
                return True
    return False


def test_network_policies_admit_only_the_callers_each_component_needs(rendered):
    policies = list(by_kind(rendered, "NetworkPolicy").values())
    deployments = by_kind(rendered, "Deployment")
    # default deny: every pod of the namespace is selected by an ingress policy without rules
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)
    ports_seen = set()
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        assert any(
            p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels)
            for p in policies
        ), f"no NetworkPolicy names {name}"
        for port in container(dep)["ports"]:
            key = (component, port["name"])
            ports_seen.add(key)
            allowed = {s for s, src in SOURCES.items() if admits(policies, labels, *key[1:], src)}
            assert allowed == EXPECTED[key], f"{name} port {port['name']}: {sorted(allowed)}"
    assert ports_seen == set(EXPECTED)


def test_network_policy_check_is_live(rendered):
    """The evaluator above is not vacuous: with no policies a prefill server is open to any
    pod, with only the default deny it is closed even to the router, and with all of them
    the router gets in and a stranger does not."""
    policies = list(by_kind(rendered, "NetworkPolicy").values())
    target, router, stranger = _pod("prefill"), SOURCES["router"], SOURCES["other namespace"]
    assert admits([], target, "grpc", stranger)
    only_deny = [p for p in policies if not p["spec"]["podSelector"]]
    assert only_deny and not admits(only_deny, target, "grpc", router)
    assert admits(policies, target, "grpc", router)
    assert not admits(policies, target, "grpc", stranger)
