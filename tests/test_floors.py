"""The packages import in floors, top to bottom; nothing imports upward, nothing cycles.

    1. tandem_cli, bench          the command line (`tandem`, `serve`, `compose`, `bench`)
    2. gateway, router            the front end (torch-free)
    3. prefill_service, decode_service   each only its servicer and server
    4. worker                     the workers' shared base
    5. kvtransfer                 KV handoff transports
    6. tandem                     the core: no grpc, no generated code
    7. tandem_kernels, protos, rpc

A module may import its own package and any package on a lower floor. Within a floor, packages
do not import each other, except the command line's `tandem bench`, which runs bench. Every
import counts, lazy ones inside functions too (they load the same code when they run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    ("tandem_cli", "bench"),
    ("gateway", "router"),
    ("prefill_service", "decode_service"),
    ("worker",),
    ("kvtransfer",),
    ("tandem",),
    ("tandem_kernels", "protos", "rpc"),
]
FOLDER = {"tandem_kernels": "kernels"}  # import name -> folder, where they differ
SAME_FLOOR_ALLOWED = {("tandem_cli", "bench")}
FLOOR = {pkg: i for i, pkgs in enumerate(FLOORS) for pkg in pkgs}
CORE_FORBIDDEN = {"grpc", "grpc_health", "grpc_reflection", "protos", "rpc"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Module name -> file, for every package module (generated code excluded)."""
    found = {}
    for pkg in FLOOR:
        for path in (ROOT / FOLDER.get(pkg, pkg)).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(ROOT / FOLDER.get(pkg, pkg)).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([pkg, *parts])] = path
    return found


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported name, line) for every import of the module, resolved to the longest known
    module name (or the bare top-level name for third-party imports)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t not in modules and "." in t:
                t = t.rpartition(".")[0]
            out.append((t, node.lineno))
    return out


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_import_climbs_a_floor():
    modules, graph = _graph()
    bad = []
    for mod, imports in graph.items():
        here = mod.split(".")[0]
        for target, line in imports:
            there = target.split(".")[0]
            if there not in FLOOR or there == here:
                continue
            if FLOOR[there] < FLOOR[here] or (
                FLOOR[there] == FLOOR[here] and (here, there) not in SAME_FLOOR_ALLOWED
            ):
                bad.append(f"{modules[mod].relative_to(ROOT)}:{line} {here} imports {target}")
    assert not bad, "imports that climb a floor or cross one sideways:\n" + "\n".join(bad)


def test_the_core_imports_no_grpc_and_no_generated_code():
    modules, graph = _graph()
    bad = [
        f"{modules[mod].relative_to(ROOT)}:{line} imports {target}"
        for mod, imports in graph.items()
        if mod.split(".")[0] == "tandem"
        for target, line in imports
        if target.split(".")[0] in CORE_FORBIDDEN
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    modules, graph = _graph()
    edges = {
        m: sorted({t for t, _ in imports if t in modules and t != m})
        for m, imports in graph.items()
    }
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_package_module_over_400_lines():
    modules, _ = _graph()
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by role: {long}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    modules = {"tandem.a.x": tmp_path, "tandem.a.z": tmp_path, "router.y": tmp_path}
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from router.y import thing\n\nfrom .z import g\n")
    assert sorted(_imports("tandem.a.x", path, modules)) == [("router.y", 2), ("tandem.a.z", 4)]
