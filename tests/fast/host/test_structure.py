"""The shape of the pack, checked from its imports (every import statement, also those inside
functions and under TYPE_CHECKING):

- pva/ is a few wings whose imports run one way: entry points -> evaluation -> pretraining ->
  training -> data / measure -> method / faces -> host -> the shared modules. Wings of the same
  floor do not import each other (the instruments in measure/ never import the method).
- No import cycle, hidden behind a function-level import or not.
- ComfyUI's internals are named in pva/host/ only. Elsewhere pva/ may import model management
  (its loading calls) and, for type names, anything under TYPE_CHECKING; the thin nodes/ may also
  use ComfyUI's public node API (comfy_api), its model folders (folder_paths) and progress bars
  (comfy.utils).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.host import REPO_ROOT

FLOORS = {
    "errors": 0,
    "files": 1, "optional": 1,
    "host": 2,
    "faces": 3,
    "method": 4, "data": 4, "measure": 4,
    "training": 5,
    "pretraining": 6,
    "evaluation": 7,
    "launch": 8,
}  # fmt: skip
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "nodes", "folder_paths", "comfyui_version", "execution", "server", "latent_preview")  # fmt: skip
ANYWHERE = ("comfy.model_management",)  # model management's loading calls
NODES_MAY_USE = ANYWHERE + ("comfy_api", "folder_paths", "comfy.utils")


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted (pva.training.session)
    target: str  # imported module, dotted
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    relative: bool = False  # from . / from .. (the pack's own modules)
    name: bool = False  # X.name of `from X import name` (a module, or not): for the cycle check


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(text: str, source: str, is_package: bool = False) -> list[Import]:
    """Every import in the code `text` of module `source` (dotted)."""
    package = source.split(".") if is_package else source.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(source, alias.name, node.lineno, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append(Import(source, target, node.lineno, type_only, bool(node.level)))
            # `from . import module` imports modules: count each name as one too (names that are
            # not modules find no module in the cycle check and share the wing of the first)
            found.extend(
                Import(source, f"{target}.{alias.name}", node.lineno, type_only, bool(node.level), name=True)
                for alias in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(text), False)
    return found


def _pack_imports(folder: str) -> list[Import]:
    return [
        i
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for i in imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")
    ]


def _wing(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _comfyui(target: str) -> bool:
    return target.split(".")[0] in COMFYUI_MODULES


def _within(target: str, allowed: tuple[str, ...]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def wing_violations(imports: list[Import]) -> list[str]:
    problems = []
    for i in imports:
        if i.name or not (i.source.startswith("pva.") and i.target.startswith("pva.")):
            continue
        source, target = _wing(i.source), _wing(i.target)
        if source == target:
            continue
        if FLOORS[target] >= FLOORS[source]:
            problems.append(f"{i.source}:{i.line} imports {i.target} ({source} may not import {target})")
    return problems


def cycles(imports: list[Import]) -> list[list[str]]:
    """Import cycles among pva's modules (strongly connected components), each as a list."""
    modules = {i.source for i in imports}
    graph = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and i.target != i.source:
            graph[i.source].add(i.target)
        else:  # `from .package import module`: the package's module, when it is one
            pass
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
            strongconnect(v)
    return found


def comfyui_violations(imports: list[Import], allowed: tuple[str, ...]) -> list[str]:
    return [
        f"{i.source}:{i.line} imports {i.target}"
        for i in imports
        if not i.relative
        and not i.name
        and _comfyui(i.target)
        and not i.type_only
        and not i.source.startswith("pva.host")
        and not _within(i.target, allowed)
    ]


def test_pva_wings_import_one_way():
    imports = _pack_imports("pva")
    assert {_wing(i.source) for i in imports if i.source.startswith("pva.")} <= set(FLOORS), (
        "a wing without a floor"
    )
    assert wing_violations(imports) == []


def test_pva_has_no_import_cycle():
    assert cycles(_pack_imports("pva")) == []


@pytest.mark.parametrize("folder, allowed", [("pva", ANYWHERE), ("nodes", NODES_MAY_USE)])
def test_comfyui_internals_are_named_in_the_host_package_only(folder, allowed):
    assert comfyui_violations(_pack_imports(folder), allowed) == []


def test_the_checks_see_what_they_are_for():
    """Control: each rule reports code written to break it (a lazy import counts too)."""
    bad = {
        "pva.method.leak": "def f():\n    import comfy.samplers\n",
        "pva.measure.peek": "from ..method.model import PVAModel\n",
        "pva.pretraining.a": "def f():\n    from .b import x\n",
        "pva.pretraining.b": "from . import a\n",
        "pva.training.typed": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from comfy.sd import VAE\n",
    }
    imports = [i for module, text in bad.items() for i in imports_of(text, module)]
    assert comfyui_violations(imports, ANYWHERE) == ["pva.method.leak:2 imports comfy.samplers"]
    assert wing_violations(imports) == [
        "pva.measure.peek:1 imports pva.method.model (measure may not import method)"
    ]
    assert cycles(imports) == [["pva.pretraining.a", "pva.pretraining.b"]]
