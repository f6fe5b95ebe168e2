"""The package's layers import one way (README "Architecture"): no import cycle, function-level
imports included, and the model layer (``flamingo_vlm.modeling``) imports nothing above it.

Read from the source with ``ast`` (nothing is imported), so a cycle held together by imports inside
functions counts as much as one at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "flamingo_vlm"
# Modules below the model layer: they import nothing from the package, and the model may use them.
FOUNDATION = {"flamingo_vlm.files", "flamingo_vlm.image_processing", "flamingo_vlm.errors", "flamingo_vlm.allocator", "flamingo_vlm.lazy"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: package modules it imports}``, every ``import`` statement anywhere in the file."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_checker_sees_function_level_cycles(tmp_path):
    pkg = tmp_path / "flamingo_vlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import flamingo_vlm.a\n")
    graph = import_graph(pkg)
    assert graph["flamingo_vlm.sub.b"] == {"flamingo_vlm.a"} and graph["flamingo_vlm.c"] == {"flamingo_vlm.a"}
    assert cycles(graph) == [["flamingo_vlm.a", "flamingo_vlm.sub.b"]]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_foundation_modules_import_nothing_from_the_package():
    graph = import_graph()
    assert {m: graph[m] for m in FOUNDATION if graph[m]} == {}


@pytest.mark.parametrize("layer", ["flamingo_vlm.modeling"])
def test_the_model_layer_imports_nothing_above_it(layer):
    graph = import_graph()
    upward = {
        mod: sorted(t for t in targets if not t.startswith(layer + ".") and t != layer and t not in FOUNDATION)
        for mod, targets in graph.items()
        if mod.startswith(layer + ".") or mod == layer
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_only_the_registry_checks_the_builtin_prefix():
    users = sorted(
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
        if any(isinstance(n, ast.Constant) and n.value == "builtin:" for n in ast.walk(ast.parse(p.read_text())))
    )
    assert users == ["registry.py"]


def test_public_model_classes_have_docstrings():
    missing = [
        f"{p.name}:{n.name}" for p in (ROOT / "modeling").glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ClassDef) and not n.name.startswith("_") and not ast.get_docstring(n)
    ]
    assert missing == []


def test_only_lm_info_probes_lm_configs_for_size_and_context():
    """The hidden size and context length are read in modeling/lm_info.py only (the LM loader's
    config translation, the MPT model's own config and the release table are data about configs)."""
    keys = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "n_embd", "d_model"}
    allowed = {"modeling/lm_info.py", "modeling/mpt.py", "lm_loading.py", "registry.py"}
    users = set()
    for p in ROOT.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if (isinstance(n, ast.Constant) and n.value in keys) or (isinstance(n, ast.Attribute) and n.attr in keys):
                users.add(str(p.relative_to(ROOT)))
    assert users - allowed == set()
