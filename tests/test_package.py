"""``import dcal`` gives the whole package as attributes, without importing torch or timm up front."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import dcal


def test_import_dcal_is_light():
    code = "import sys, dcal; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subpackages_and_api_are_attributes():
    code = (
        "import dcal\n"
        "assert callable(dcal.data.build_dataset) and callable(dcal.losses.DCALLoss)\n"
        "assert callable(dcal.metrics.evaluate_reid) and callable(dcal.engine.fit)\n"
        "assert dcal.create_model is dcal.model.create_model and dcal.DCAL is dcal.model.DCAL\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    for name in dcal.SUBMODULES:
        assert isinstance(getattr(dcal, name), types.ModuleType)
    assert set(dcal.__all__) <= set(dir(dcal))


def test_every_module_of_the_package_is_listed():
    root = Path(dcal.__file__).parent
    found = {p.stem for p in root.glob("*.py") if not p.name.startswith("_")}
    found |= {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert found == set(dcal.SUBMODULES)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dcal.nope  # noqa: B018


def test_the_wheel_ships_the_recipes_and_the_license_and_pypi_text_has_no_relative_links(tmp_path):
    import re
    import shutil
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"  # a copy: building in the checkout would leave build/ and *.egg-info there
    tree.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(repo / name, tree / name)
    shutil.copytree(repo / "docs", tree / "docs")
    shutil.copytree(repo / "configs", tree / "configs")
    shutil.copytree(repo / "src", tree / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (tree / "src" / "dcal" / "recipes").is_symlink()  # one copy of the recipes in git: configs/
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dcal-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        licence = next(z.read(n).decode() for n in names if n.endswith("licenses/LICENSE"))
    recipes = {p.relative_to(repo / "configs").as_posix() for p in (repo / "configs").rglob("*.yaml")}
    assert {f"dcal/recipes/{r}" for r in recipes} <= names
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "License-Expression: Apache-2.0" in metadata
    description = metadata.split("\n\n", 1)[1]
    assert "dcal demo" in description and not re.findall(r"\]\((?!https?://)", description)


@pytest.mark.parametrize(("package", "allowed"), [
    ("model", {"dcal.checkpoint", "dcal.vocabulary"}),
    ("data", {"dcal.vocabulary"}),
    ("metrics", set()),
])
def test_the_core_packages_import_only_what_design_md_allows(package, allowed):
    """docs/design.md's layering: model/, data/ and metrics/ never import the config, the engine or a command
    (an import inside a function counts too)."""
    import ast

    root = Path(dcal.__file__).parent
    found = set()
    for path in (root / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found |= {n for n in names if n.startswith("dcal") and not n.startswith(f"dcal.{package}")}
    assert found <= allowed, sorted(found - allowed)


def _import_graph() -> dict[str, set[str]]:
    """dcal's modules and the dcal modules each imports at run time: at the top and inside functions alike (an
    import deferred into a function still ties the two modules together), ``if TYPE_CHECKING:`` blocks aside."""
    import ast

    root = Path(dcal.__file__).parent.parent
    modules = {}
    for path in (root / "dcal").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                for child in node.body for n in ast.walk(child)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcal"):
                found = [target(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                found = [target(a.name) for a in node.names if a.name.startswith("dcal")]
            else:
                continue
            graph[name] |= {t for t in found if t and t != name and not name.startswith(f"{t}.")}
    return graph


def test_no_import_circles_counting_imports_inside_functions():
    """No two dcal modules import each other, directly or through others, even where one import is deferred into a
    function (issue 28: the layering must hold by construction, not by deferring imports). A package's own
    ``__init__`` re-exporting its modules is not a circle."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles
