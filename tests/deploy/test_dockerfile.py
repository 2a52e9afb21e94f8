"""Dockerfile, read statically (no Docker engine here): stages, what the final stage installs,
its user, and that it carries every package pyproject ships. `docker build` itself was not
run on this machine (docs/deploy.md says what was)."""

from __future__ import annotations

import ast
import json
import re
import shlex

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from deploy_helpers import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

DOCKERFILE = ROOT / "Dockerfile"
# Triton JIT-compiles its kernel launcher at run time; everything else a compiler or build
# system would be doing in the final stage is a mistake.
RUNTIME_APT_ALLOWED = {"gcc", "libc6-dev"}
BUILD_TOOLS = re.compile(
    r"\b(g\+\+|clang|build-essential|make|cmake|ninja|git|cargo|rustc|python3?-dev|"
    r"grpcio-tools|setuptools|wheel)\b"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical = buf + stripped
        buf = ""
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(text: str) -> tuple[dict[str, str], list[tuple[str, list[tuple[str, str]]]]]:
    """Global ARG defaults, and [(stage name, its instructions)] in order."""
    global_args, result = {}, []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(result))
            result.append((name, [(keyword, args)]))
        elif not result:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            result[-1][1].append((keyword, args))
    return global_args, result


def apt_packages(run: str) -> set[str]:
    """Packages named by `apt-get install` commands inside one RUN."""
    found = set()
    for m in re.finditer(r"apt-get install ([^;&|]+)", run):
        found |= {w for w in shlex.split(m.group(1)) if not w.startswith("-")}
    return found


def test_multi_stage_build_from_a_cuda_pytorch_base_in_the_supported_torch_range():
    global_args, st = stages(DOCKERFILE.read_text())
    assert [name for name, _ in st] == ["build", "runtime"]
    base = global_args["BASE_IMAGE"]
    assert all(ins[0][1].split()[0] == "${BASE_IMAGE}" for _, ins in st)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert m, base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(
        Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("torch")
    )
    assert Version(m.group(1)) in torch_req.specifier


def test_build_stage_installs_the_package_so_protos_are_generated():
    _, st = stages(DOCKERFILE.read_text())
    build = dict(st)["build"]
    copied = {src.rstrip("/") for kw, args in build if kw == "COPY" for src in args.split()[:-1]}
    assert {"setup.py", "pyproject.toml", "README.md", "protos"} <= copied
    # every source folder setup.py ships is in the build context
    packages = set(_setup_constant("SOURCE_FOLDERS"))
    assert "kernels" in packages
    assert packages <= copied, packages - copied
    runs = " ".join(args for kw, args in build if kw == "RUN")
    assert "pip install ." in runs  # runs setup.py build_py: protos/*_pb2*.py generated
    assert "protos.worker_pb2" in runs  # and checked importable in the build


def _setup_constant(name: str):
    """A literal assigned at the top level of setup.py (running setup.py would build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


def test_final_stage_runs_as_a_non_root_user_with_no_build_tools():
    _, st = stages(DOCKERFILE.read_text())
    name, runtime = st[-1]
    assert name == "runtime"
    users = [args for kw, args in runtime if kw == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    runs = [args for kw, args in runtime if kw == "RUN"]
    assert any("useradd --system --uid 10001" in r and user in r for r in runs)
    for run in runs:
        assert apt_packages(run) <= RUNTIME_APT_ALLOWED, run
        assert "--no-install-recommends" in run or "apt-get install" not in run
        assert not BUILD_TOOLS.search(run), run
        assert "pip install" not in run  # installing belongs to the build stage
    copies = [args for kw, args in runtime if kw == "COPY"]
    assert copies == ["--from=build /opt/tandem /opt/tandem"]  # no source tree, no wheels


def test_final_stage_entrypoint_volumes_and_environment():
    _, st = stages(DOCKERFILE.read_text())
    runtime = st[-1][1]
    last = {kw: args for kw, args in runtime}
    assert json.loads(last["ENTRYPOINT"]) == ["tandem"]
    volumes = set(json.loads(last["VOLUME"]))
    assert {"/model", "/home/tandem/.cache"} <= volumes
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    for var in ("HF_HOME=/home/tandem/.cache/", "TANDEM_CACHE=/home/tandem/.cache/"):
        assert var in env
    assert "PATH=/opt/tandem/bin:" in env


def test_dockerignore_keeps_the_context_small():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "**/__pycache__", "protos/*_pb2.py"} <= ignored
    # nothing the build copies is ignored
    for needed in ("pyproject.toml", "setup.py", "README.md", "protos", "tandem"):
        assert needed not in ignored


def test_parser_reads_continuations_and_stage_names():
    text = "ARG A=1\nFROM x AS one\nRUN apt-get install -y \\\n  # note\n  gcc make\nFROM one\nUSER 0\n"
    global_args, st = stages(text)
    assert global_args == {"A": "1"}
    assert [n for n, _ in st] == ["one", "1"]
    assert apt_packages(st[0][1][1][1]) == {"gcc", "make"}
