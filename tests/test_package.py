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


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped (``_`` and ``-`` kept), spaces as
    hyphens, a repeated heading numbered ``-1``, ``-2``, ... Lines inside fenced code blocks are not headings."""
    import re

    found: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if fenced or not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link in a heading: its text
        base = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        slug, n = base, 0
        while slug in found:
            n += 1
            slug = f"{base}-{n}"
        found.add(slug)
    return found


def broken_links(repo: Path, pages: list[Path]) -> list[str]:
    """Every relative ``](path)`` and ``](path#anchor)`` of ``pages`` (outside fenced code) that names no file, or a
    heading that the Markdown file it names does not have; web addresses are not checked."""
    import re

    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(repo)}: ]({target})"
            if not file.exists():
                broken.append(f"{where}: no file {path}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{where}: {file.relative_to(repo)} has no heading #{anchor}")
    return broken


def test_every_relative_link_of_the_readme_and_docs_points_to_a_file_and_heading():
    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", repo / "CHANGELOG.md", repo / "benchmarks" / "README.md",
             *sorted((repo / "docs").glob("*.md"))]
    assert len(pages) > 8
    assert broken_links(repo, pages) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some `code`: here\n\n```\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#some-code-here) [self](#top) [web](https://x.org/y#z)\n\n# Top\n\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#not-a-heading) ![pic](docs/a.png)\n\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert broken_links(tmp_path, [page]) == [
        "README.md: ](docs/b.md): no file docs/b.md",
        "README.md: ](docs/a.md#not-a-heading): docs/a.md has no heading #not-a-heading",
        "README.md: ](docs/a.png): no file docs/a.png",
    ]


def test_docs_commands_md_lists_every_command_and_option_of_the_parser():
    """docs/commands.md's option tables are written from dcal.cli's parser by docs/cli_reference.py: a flag added,
    removed or renamed in the code without rerunning it fails here."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cli_reference", repo / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.DOC.read_text(encoding="utf-8")
    assert module.replace_section(text, module.render()) == text, "run: python docs/cli_reference.py"
    for command in ("train", "eval", "demo", "predict", "embed", "search", "index build", "export", "ablation"):
        assert f"### `dcal {command}`" in text
