"""Helpers for the deploy tests: the Compose merge and interpolation rules these files rely on.

There is no Docker engine (nor the compose plugin) on the test machines, so the tests apply
the Compose Specification's documented rules themselves, for the subset the files use:
YAML anchors and `<<` merge keys (done by the YAML loader), `${NAME:-default}` interpolation,
and the merge of an override file (mappings merge key by key, sequences append, `command`,
`entrypoint` and `healthcheck.test` are replaced; a service with `profiles` stays off unless
its profile is enabled).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_SCHEMA = json.loads((HERE / "compose-spec.json").read_text())

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def validate_compose(doc: dict) -> None:
    """Raise jsonschema.ValidationError unless `doc` follows the Compose Specification."""
    jsonschema.Draft7Validator(COMPOSE_SCHEMA).validate(doc)


def variables(doc) -> dict[str, str | None]:
    """Every ${NAME...} used in `doc`'s values: NAME -> its default (None: no default)."""
    found: dict[str, str | None] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for m in _VAR.finditer(node.replace("$$", "")):
                default = m["arg"] if m["op"] in (":-", "-") else None
                found.setdefault(m["name"], default)

    walk(doc)
    return found


def interpolate(doc, env: dict[str, str] | None = None):
    """`doc` with each ${NAME:-default} replaced by env[NAME] or, when unset, its default."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if name in env and (env[name] != "" or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise KeyError(f"${{{name}}} has no value and no default")

    if isinstance(doc, dict):
        return {k: interpolate(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate(v, env) for v in doc]
    if isinstance(doc, str):
        return _VAR.sub(sub, doc).replace("$$", "$")
    return doc


def merge_compose(base: dict, override: dict) -> dict:
    """The application model of `docker compose -f base -f override` (the rules above)."""

    def merge(a, b, path: tuple[str, ...]):
        if path in _REPLACED:
            return copy.deepcopy(b)
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for k, v in b.items():
                out[k] = merge(a[k], v, (*path, k)) if k in a else copy.deepcopy(v)
            return out
        if isinstance(a, list) and isinstance(b, list):
            return [*a, *copy.deepcopy(b)]
        return copy.deepcopy(b)

    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key == "services":
            services = merged.setdefault("services", {})
            for name, svc in value.items():
                if name in services:
                    services[name] = merge(services[name], svc, ())
                else:
                    services[name] = copy.deepcopy(svc)
        elif not key.startswith("x-"):
            merged[key] = merge(merged.get(key), value, (key,)) if key in merged else value
    return merged


def active_services(model: dict, profiles: tuple[str, ...] = ()) -> dict[str, dict]:
    """The services `docker compose up` starts with these profiles enabled."""
    return {
        name: svc
        for name, svc in model["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of `--flag=value` in an exec-form command, None when absent."""
    for arg in command:
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


def gpu_device_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    ids: list[str] = []
    for d in devices or []:
        assert d.get("driver") == "nvidia" and "gpu" in d["capabilities"], d
        ids.extend(d["device_ids"])
    return ids


def seconds(duration: str) -> float:
    """A Compose duration ('45s', '1m30s', '600s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)
