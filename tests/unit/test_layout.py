"""The package layout: no import cycles (imports inside functions included), the pure core stays pure."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"models": "simreg.models", "orchestrator": "simreg.orchestrator", "search_spaces": "simreg.search_spaces"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """simreg modules ``path`` imports anywhere in the file (module level or inside functions; not the
    annotations-only imports under ``if TYPE_CHECKING:``, which never run)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If) and ast.unparse(top.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simreg."):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("simreg.")}
    return {m for m in found if m in modules}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(f, modules) - {m} for m, f in modules.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert len(graph) > 40  # the walk saw the whole package


def test_models_import_neither_ray_nor_mlflow():
    for f in (REPO / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("ray", "mlflow")], f"{f} imports {names}"


def test_private_ray_apis_live_in_ray_compat_only():
    for f in (REPO / "orchestrator").rglob("*.py"):
        if f.name == "ray_compat.py":
            continue
        text = f.read_text()
        for private in ("._internal", "v2.api", "idle_worker_killing", "checkpoint_manager_snapshot"):
            assert private not in text, f"{f} uses {private}: go through orchestrator/ray_compat.py"
