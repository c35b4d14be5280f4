"""The package's architecture, checked: no Ray outside ``dap_ray.steps``, and no import circle.

Imports are read from the source (module level and inside functions alike), so a lazy
``import ray`` in a library function is caught as surely as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dap_ray"
RAY_EDGE = "dap_ray.steps"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LIBRARY = sorted(m for m in MODULES if m != RAY_EDGE and not m.startswith(RAY_EDGE + "."))


def imported_modules(name: str) -> set[str]:
    """Every module ``name`` imports anywhere in its source, absolute names, submodules resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = {m for m in imported_modules(name) if m in MODULES and m != name}
        # An import of a package's submodule runs the package's __init__ first; that edge is
        # Python's, not the code's, and is left out as import-linter leaves it out.
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_library_modules_and_step_modules():
    assert {"dap_ray.localisation.cam", "dap_ray.localisation.boxes", "dap_ray.models.detectors",
            "dap_ray.data.sources", "dap_ray.evaluation.localisation"} <= set(LIBRARY)
    assert {"dap_ray.steps.classify", "dap_ray.steps.mine", "dap_ray.steps.pretrain"} <= set(MODULES)


@pytest.mark.parametrize("name", LIBRARY)
def test_library_module_imports_no_ray_and_no_step(name):
    imports = imported_modules(name)
    assert not {m for m in imports if m == "ray" or m.startswith("ray.")}, f"{name} imports Ray"
    assert not {m for m in imports if m == RAY_EDGE or m.startswith(RAY_EDGE + ".")}, \
        f"{name} imports a Ray step module"


def test_library_imports_with_ray_unavailable():
    """Importing every library module with ``ray`` made unimportable succeeds (nothing pulls Ray in)."""
    script = (
        "import importlib, sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is not available to the library')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        f"for name in {LIBRARY!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_ray_blocker_catches_a_library_module_that_imports_ray(tmp_path):
    module = tmp_path / "sneaky.py"
    module.write_text("import numpy\n\ndef f():\n    import ray.data\n")
    MODULES["dap_ray.sneaky_for_test"] = module
    try:
        assert "ray.data" in imported_modules("dap_ray.sneaky_for_test")
    finally:
        del MODULES["dap_ray.sneaky_for_test"]


def test_no_import_circle():
    assert cycles(internal_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({}, []),
    ({"a": set()}, []),
    ({"a": {"b"}, "b": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected


def test_detectron2_adapter_builds_on_the_torchvision_path_not_the_reverse():
    graph = internal_graph()
    d2 = "dap_ray.steps.pretrain.detectron2_backend"
    assert "dap_ray.steps.pretrain.config" in graph[d2]
    assert not any(d2 in graph[m] for m in graph if m not in ("dap_ray.steps.pretrain",))
