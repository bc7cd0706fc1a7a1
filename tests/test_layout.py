"""The package's layout is its architecture: every module imports on its own, the module
import graph has no cycle, and the layers point one way (tangents <- engine <- estimators <-
optimizer and integrations)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fwdgrad_plugins"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body); ``from a import b``
    with ``a.b`` a module counts as importing ``a.b``."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                found |= submodules or {node.module}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_module_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "fwdgrad_plugins.tangents.streaming" in graph
    assert cycles(graph) == []


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


LOWER_LAYERS_NEVER_IMPORT = {
    "fwdgrad_plugins.tangents": ("engine", "estimators", "integrations", "optim", "plugins"),
    # what the engine asks of a sharded parameter sits below the engine (checkpoint.py is a top layer)
    "fwdgrad_plugins.distributed.fsdp": ("engine", "estimators", "integrations", "optim", "plugins"),
    "fwdgrad_plugins.engine": ("estimators", "integrations", "optim", "plugins"),
    "fwdgrad_plugins.estimators": ("integrations", "optim"),
}


@pytest.mark.parametrize("layer", LOWER_LAYERS_NEVER_IMPORT)
def test_a_layer_imports_nothing_above_it(layer):
    above = tuple(f"fwdgrad_plugins.{name}" for name in LOWER_LAYERS_NEVER_IMPORT[layer])
    wrong = {module: sorted(m for m in imported if m.startswith(above))
             for module, imported in import_graph().items() if module.startswith(layer)}
    assert not any(wrong.values()), {m: w for m, w in wrong.items() if w}


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported with none of the package loaded before it (one interpreter, the
    package's modules cleared between imports): no import works only because another module
    happened to be imported first."""
    script = ("import importlib, sys, torch, transformers, accelerate, pluggy\n"
              "for name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m.startswith('fwdgrad_plugins')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n"
              "    print('imported', name)\n")
    names = [name for name in module_files() if not name.endswith("__main__")]
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [word for name in names for word in ("imported", name)]
