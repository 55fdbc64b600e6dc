"""The library's layout (issue 16's facts anyone can check): no file over 400 lines, and it reads in the paper's
order: no module imports from a module above it.

schedules (β) → chain (the coefficients of eq. 4, 6, 7) → gaussians (KL, the decoder of eq. 13) → scheduler (the
forward and reverse processes, the bound's terms) → bound (eq. 5 over a batch) → pipeline (sampling and bits/dim).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_ddpm"
PAPER_ORDER = ("schedules", "chain", "gaussians", "scheduler", "bound", "pipeline")


def package_imports(module: str, package: Path = PACKAGE) -> set[str]:
    """The hf_ddpm modules that `module` imports anywhere in its body (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse((package / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import a
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("hf_ddpm."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hf_ddpm."))
    return found


@pytest.mark.parametrize("module", PAPER_ORDER)
def test_no_module_imports_from_a_module_above_it(module):
    later = set(PAPER_ORDER[PAPER_ORDER.index(module) :])
    assert not package_imports(module) & later, f"{module}.py imports {sorted(package_imports(module) & later)}"


def test_each_module_imports_the_one_it_builds_on():
    """The order is real, not vacuous: each module uses the one before it (or, for bound, the one before that)."""
    assert "schedules" in package_imports("chain")
    assert {"chain", "gaussians", "schedules"} <= package_imports("scheduler")
    assert "gaussians" in package_imports("bound")
    assert {"bound", "scheduler"} <= package_imports("pipeline")


def test_the_parser_sees_every_kind_of_import(tmp_path):
    source = (
        "from .chain import a\nfrom . import bound\nimport hf_ddpm.pipeline\n\ndef f():\n    from .scheduler import b\n"
    )
    (tmp_path / "probe.py").write_text(source)
    assert package_imports("probe", tmp_path) == {"chain", "bound", "pipeline", "scheduler"}


def test_no_library_file_is_over_400_lines():
    """Small files named for what they hold (the project brief): split a module before it passes 400 lines."""
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"library files over 400 lines: {long}"


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its body}, modules named by dotted path ("training.loop");
    `from . import x` names the submodule x, `from .x import a` the module x (or x.a when that is a module)."""
    modules = {
        ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__"): p
        for p in package.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("hf_ddpm")):
                continue
            if node.level:
                parts = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".")[1:]
            base = ".".join(parts)
            for alias in node.names:
                target = f"{base}.{alias.name}" if base else alias.name
                graph[name].add(target if target in modules else base)
        graph[name] -= {name, ""}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: each a path of modules that leads back to its first one."""
    circles, done = [], set()

    def visit(module, path):
        if module in path:
            circles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return circles


def test_no_import_circle_in_the_package():
    """A reader can take each module after the ones it imports: no module imports (even lazily, inside a function)
    one that imports it back, directly or through others."""
    assert not import_circles(module_graph()), import_circles(module_graph())


def test_the_circle_finder_finds_a_lazy_circle(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("from .sub.b import f\n")
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (tmp_path / "c.py").write_text("from .sub import b\n")
    graph = module_graph(tmp_path)
    assert graph["a"] == {"sub.b"} and graph["c"] == {"sub.b"} and graph["sub.b"] == {"a"}
    assert import_circles(graph) == [["a", "sub.b", "a"]]
