"""The package layout's rules (docs/design.md §3): dependency direction and no import cycle.

Read from the source with ``ast`` (every ``import``, late ones inside functions included), so a cycle
hidden behind a late or ``TYPE_CHECKING`` import is found too; then every module is imported in a
fresh interpreter, in two orders.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
#: The modules that inject a simulated site's faults: no deployed module imports them.
SIMULATION_INJECTION = ("client.simulation.faults", "client.simulation.app")
#: What each top-level package may import of the project (simulations -> client, server -> common).
ALLOWED = {
    "common": {"common"},
    "client": {"client", "common"},
    "server": {"server", "common"},
    "simulations": {"simulations", "client", "server", "common"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path], load_time: bool = False) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (``from a.b import c`` counts
    ``a.b.c`` when that is a module, else ``a.b``); ``load_time``: only those its loading runs
    (not the imports inside functions nor under ``if TYPE_CHECKING``)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in load_time_nodes(tree) if load_time else ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def load_time_nodes(tree: ast.AST):
    """The nodes of ``tree`` that run when the module is loaded: no function body, no ``if TYPE_CHECKING``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *load_time_nodes(child)])
            continue
        yield node
        yield from load_time_nodes(node)


def loaded_with(module: str, modules: dict[str, Path]) -> set[str]:
    """Every project module that importing ``module`` loads: its load-time imports, theirs, and the
    packages above each of them (``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(imports_of(modules[name], modules, load_time=True))
    return seen


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {m for m in imports_of(path, modules) if m in modules and m != name} for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_find_cycle_sees_a_constructed_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_project_modules():
    assert find_cycle(import_graph()) is None


def test_dependency_direction():
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert wrong == []


def test_load_time_imports_leave_out_functions_and_type_checking(tmp_path):
    (tmp_path / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import client.a\n"
        "if TYPE_CHECKING:\n    import client.b\n"
        "else:\n    import client.c\n"
        "try:\n    import client.d\nexcept ImportError:\n    pass\n"
        "def f():\n    import client.e\n"
        "class C:\n    import client.f\n    def g(self):\n        import client.h\n"
    )
    modules = {f"client.{x}": tmp_path / "m.py" for x in "abcdefh"}
    assert imports_of(tmp_path / "m.py", modules, load_time=True) == {"client.a", "client.c", "client.d", "client.f"}
    assert "client.e" in imports_of(tmp_path / "m.py", modules)


def test_deployed_client_app_does_not_import_simulation_code_at_load():
    """``client.simulation`` (partition manifests, injected faults) is imported only when a
    simulation's manifest is in the run config, never when a hospital's SuperNode loads the app:
    neither by ``client.client_app`` nor by anything it loads, read from the source and seen in a
    fresh interpreter."""
    loaded = loaded_with("client.client_app", project_modules())
    assert {"client.client_app", "client.federation.node", "client", "common.records"} <= loaded
    assert sorted(m for m in loaded if m.startswith("client.simulation")) == []
    code = "import sys\nimport client.client_app\nprint(sorted(m for m in sys.modules if m.startswith('client.simulation')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def identifiers(tree: ast.AST) -> set[str]:
    """Every name the code of ``tree`` binds or reads (variables, attributes, arguments, functions, classes,
    imported names); not strings nor comments."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.alias):
            out.update(n for n in (node.name, node.asname) if n)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
    return out


def test_fault_injection_lives_only_in_the_simulation_package():
    """Issue 28: the deployed ClientApp has no fault code path. No module of ``client`` outside
    ``client.simulation`` names a fault or imports the modules that inject one (``client.simulation.faults``,
    ``client.simulation.app``; the manifest reader ``client.simulation.partitions`` is what a virtual node's
    ``SiteNode`` reads), ``SiteNode`` has no fault field, and the deployed ``app`` carries only the site's mods."""
    from client.client_app import app
    from client.federation.guard import policy_mod
    from client.federation.node import SiteNode
    from client.federation.site_clipping import site_clipping_mod

    assert "fault" not in {f.name for f in dataclasses.fields(SiteNode)}
    assert app._mods == [policy_mod, site_clipping_mod]  # the simulation's adds client.simulation.app.fault_mod
    modules = project_modules()
    fault_words = {"fault", "faults", "faulty"}
    found = []
    for name, path in sorted(modules.items()):
        if name.split(".")[0] != "client" or name.startswith("client.simulation"):
            continue
        found += [f"{name} imports {m}" for m in imports_of(path, modules) if m.startswith(SIMULATION_INJECTION)]
        words = {
            i
            for i in identifiers(ast.parse(path.read_text(encoding="utf-8")))
            if fault_words & set(i.lower().split("_"))
        }
        found += [f"{name} names {w}" for w in sorted(words)]
    assert found == []


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(project_modules())
    if order == "shuffled":
        random.Random(7).shuffle(names)
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
