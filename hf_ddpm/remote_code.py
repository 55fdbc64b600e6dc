"""Remote-code modules of a pipeline repo: self-contained files generated from this package's source at save time.

A repo loads with `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` on a machine without hf_ddpm
because it carries the code itself and `model_index.json` names it (H, h: 8 hex digits of each file's sha256):

    model_index.json                    "_class_name": ["pipeline_hf_ddpm_H", "HFDDPMPipeline"],
                                        "scheduler": ["scheduling_hf_ddpm_h", "HFDDPMScheduler"], "unet": ["diffusers", ...]
    scheduler/scheduling_hf_ddpm_h.py   schedules + chain + gaussians + scheduler_configs + scheduler
    pipeline_hf_ddpm_H.py               images + bound + pipeline_folder + standalone + pipeline, importing the rest with
                                        `from .scheduler.scheduling_hf_ddpm_h import ...` (diffusers fetches that file)

diffusers 0.42 copies every remote module into one flat folder (HF_MODULES_CACHE/diffusers_modules/local; a
`from .scheduler.x import` into its scheduler/ subfolder) and re-executes a module of the same name in place, so
the names are distinctive and carry a hash of the code: two repos saved by different versions of hf_ddpm load side
by side in one process instead of swapping code under each other. Each file is the package's own modules
concatenated in dependency order with their relative imports removed (`from .x import a` needs nothing once x's
text precedes it) or, in the pipeline module, pointed at the scheduler module. What the pipeline reaches beyond the
algorithm (hub.py, loading.py, evaluation/likelihood.py: model cards, push checks, the atomic writer, scipy) is not
bundled: a relative import of one of them is read as an import of its stand-in (`STAND_INS`: standalone.py, which
answers to the same names), so the bundled pipeline class is the package's, line for line, and never imports
hf_ddpm. Of each module only the top-level definitions the bundled classes reach are kept (`reachable`: the
scheduler module's reach from HFDDPMScheduler and from what the pipeline module imports), with the imports they
use: the package's training, evaluation and Space helpers stay out. Docstrings keep their first paragraph (the
full text is in the package). The bundler's rules, which the bundled modules keep (each says so at its top):
top-level names unique across the bundled modules, relative imports named (`from .x import a`, never `from . import
x`) and only at the top level. `bundle_source` refuses what breaks them, and any import of a package outside
`ALLOWED_IMPORTS`. The files are regenerated at every save, never kept by hand.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from pathlib import Path

from .shipped import PACKAGE_DIR

PIPELINE_PREFIX = "pipeline_hf_ddpm"  # at the repo root (diffusers looks for `<_class_name[0]>.py` there)
SCHEDULER_PREFIX = "scheduling_hf_ddpm"  # in scheduler/ (diffusers looks in the component's folder)
PIPELINE_CLASS, SCHEDULER_CLASS = "HFDDPMPipeline", "HFDDPMScheduler"
SCHEDULER_SOURCES = ("schedules", "chain", "gaussians", "scheduler_configs", "scheduler")
PIPELINE_SOURCES = (
    "images",
    "bound",
    "pipeline_folder",
    "standalone",
    "pipeline",
)  # + an import of the scheduler module's names
# package module -> the bundled module in its place (publishing, loading, likelihood estimators needing scipy)
STAND_INS = {"hub": "standalone", "loading": "standalone", "evaluation.likelihood": "standalone"}
# The budget of a repo's remote code, both modules: diffusers imports them on every load (and a Space at every
# start), so they hold the algorithm and no more. Measured with docstrings cut to their first paragraph by the
# bundler, never by trimming the package's documentation: a module that outgrows it asks what else it holds.
BUNDLE_BUDGET_BYTES = 50_000
RULES = (
    "# Bundled by hf_ddpm/remote_code.py into a Hub repo's remote code: keep top-level names unique across the\n"
    "# bundled modules, and relative imports named (from .x import a) and at the top level."
)
# What a machine with diffusers has: its dependencies (torch is required to run any pipeline) and the stdlib.
ALLOWED_IMPORTS = frozenset({"diffusers", "huggingface_hub", "numpy", "PIL", "safetensors", "torch"})


class BundleError(ValueError):
    """The package source cannot be turned into a self-contained module."""


def bundle_source(
    modules: tuple[str, ...],
    title: str,
    package_dir: Path = PACKAGE_DIR,
    version: str = "",
    imports_from: tuple[str, tuple[str, ...], str] | None = None,
    stand_ins: dict[str, str] | None = None,
    roots: tuple[str, ...] | None = None,
) -> str:
    """One Python module made of `package_dir/<m>.py` for m in `modules` (dependency order), self-contained but for
    `imports_from` = (relative module, the package modules it holds, its source): relative imports of those
    modules become named imports from it (the pipeline module imports the scheduler module so). `stand_ins` maps
    a package module that is not bundled to the bundled module that answers in its place (see `STAND_INS`). With
    `roots`, only the top-level definitions those names reach are kept (see `reachable`), and the imports they use."""
    bundle = _Bundle(modules, imports_from, stand_ins)
    texts, digests = {}, {}
    for name in modules:
        path = package_dir / f"{name}.py"
        text = path.read_text(encoding="utf-8")
        digests[name] = f"{name}.py sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        texts[name] = bundle.add(name, text, str(path))
    used = None
    if roots is not None:
        trees = {name: ast.parse(text) for name, text in texts.items()}
        kept = reachable(trees, roots)
        texts = {name: _keep_definitions(texts[name], trees[name], kept) for name in modules}
        texts = {name: text for name, text in texts.items() if text is not None}
        used = {n.id for text in texts.values() for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
    sections = [f"# {'-' * 40} hf_ddpm/{name}.py\n\n" + first_paragraphs(text) for name, text in texts.items()]
    header = (
        f'"""{title}\n\nGenerated by hf_ddpm {version} (hf_ddpm/remote_code.py) from the package source; do not edit '
        "(docstrings are cut to their first paragraph"
        + ("; only the definitions the bundled classes reach are kept" if roots is not None else "")
        + "):\n"
        + "".join(f"    {digests[name]}\n" for name in texts)
        + '"""\n\n'
        + RULES
        + "\n\nfrom __future__ import annotations\n\n"
        + "\n".join(sorted(s for bound, s in bundle.statements if used is None or bound in used))
        + "\n"
        + "".join(f"{line}\n" for line in bundle.relative_statements(used))
    )
    source = header + "\n\n" + "\n\n".join(sections)
    check_self_contained(source, allowed_relative=imports_from[0] if imports_from else None)
    return source


def reachable(trees: dict[str, ast.Module], roots: tuple[str, ...]) -> set[str]:
    """The top-level names of `trees` (modules with their relative imports inlined, so one namespace) that `roots`
    reach: a definition reaches every name its node mentions (body, decorators, annotations, default values, base
    classes, an assignment's value), and statements that bind no name run at import, so they are roots too."""
    defines: dict[str, ast.stmt] = {}
    todo = list(roots)
    for tree in trees.values():
        for node in tree.body:
            bound = _bound_names(node)
            for name in bound:
                defines[name] = node
            if not bound and not _is_docstring(node) and not isinstance(node, (ast.Import, ast.ImportFrom)):
                todo.extend(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    missing = [name for name in roots if name not in defines]
    if missing:
        raise BundleError(f"bundle roots {missing} are defined by none of the modules {sorted(trees)}")
    kept: set[str] = set()
    while todo:
        name = todo.pop()
        if name in defines and name not in kept:
            kept.add(name)
            todo.extend(n.id for n in ast.walk(defines[name]) if isinstance(n, ast.Name))
    return kept


def _keep_definitions(text: str, tree: ast.Module, kept: set[str]) -> str | None:
    """`text` without the top-level definitions outside `kept` (with the comment lines right above them); None when
    none of its definitions is kept (its docstring alone would describe what the bundle does not hold)."""
    lines = text.splitlines()
    dropped: set[int] = set()
    holds = False
    for node in tree.body:
        bound = _bound_names(node)
        if not bound or kept.intersection(bound):
            holds = holds or bool(bound) or not _is_docstring(node)
            continue
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        while start > 0 and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        dropped.update(range(start, node.end_lineno))
    if not holds:
        return None
    body = "\n".join(line for i, line in enumerate(lines) if i not in dropped)
    return re.sub(r"\n{4,}", "\n\n\n", body.strip()) + "\n"


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def first_paragraphs(source: str) -> str:
    """`source` with every docstring cut to its first paragraph (what `help()` shows first); the code unchanged."""
    lines = source.splitlines()
    cuts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                blank = next((i for i in range(first.lineno, first.end_lineno) if not lines[i].strip()), None)
                if blank is not None:
                    cuts.append((first.lineno - 1, blank, first.end_lineno))
    for start, blank, end in sorted(cuts, reverse=True):
        quote = '"""' if '"""' in lines[start] else "'''"
        last = lines[blank - 1].rstrip()
        lines[start:end] = [*lines[start : blank - 1], last + (" " if last.endswith(('"', "'", "\\")) else "") + quote]
    return "\n".join(lines) + "\n"


class _Bundle:
    """The names bound so far while concatenating modules, to inline relative imports and refuse collisions."""

    def __init__(
        self,
        modules: tuple[str, ...],
        imports_from: tuple[str, tuple[str, ...], str] | None = None,
        stand_ins: dict[str, str] | None = None,
    ):
        self.modules = modules
        self.stand_ins = stand_ins or {}
        self.external, self.external_modules, external_source = imports_from or ("", (), "")
        self.external_names = set(_top_level_names(ast.parse(external_source))) if imports_from else set()
        self.imported: set[str] = set()  # names imported from the external module
        self.statements: set[tuple[str, str]] = set()  # (name bound, absolute import), hoisted to the top
        self.origins: dict[str, str] = {}  # name bound by an import -> what it is ("numpy", "torch.nn.Module")
        self.defined: dict[str, str] = {}  # top-level name -> "<module>.py" that defines it

    def add(self, name: str, text: str, filename: str) -> str:
        """`text` without its top-level imports (hoisted or inlined); its definitions registered."""
        tree = ast.parse(text, filename=filename)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and id(node) not in top:
                raise BundleError(f"{name}.py line {node.lineno}: a relative import inside a block cannot be bundled")
        replacements: dict[int, list[str]] = {}  # first line of a removed import -> lines replacing it
        removed: set[int] = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                removed.update(range(node.lineno - 1, node.end_lineno))
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    replacements[node.lineno - 1] = self._inline(node, name)
                elif not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    self._hoist(node, name)
        for bound in _top_level_names(tree):
            self._define(bound, name)
        body = []
        for i, line in enumerate(text.splitlines()):
            body.extend(replacements.get(i, []))
            if i not in removed:
                body.append(line)
        return re.sub(r"\n{4,}", "\n\n\n", "\n".join(body).strip()) + "\n"  # removed imports left blank runs

    def _define(self, bound: str, name: str) -> None:
        if bound in self.defined or bound in self.origins:
            where = self.defined.get(bound) or f"`import {self.origins[bound]}`"
            raise BundleError(f"{name}.py defines {bound!r}, also bound by {where}: rename one to bundle them")
        self.defined[bound] = f"{name}.py"

    def _bind(self, bound: str, origin: str, name: str) -> None:
        if bound in self.defined or self.origins.get(bound, origin) != origin:
            where = self.defined.get(bound) or f"`import {self.origins[bound]}`"
            raise BundleError(f"{name}.py binds {bound!r} to {origin}, already bound by {where}")
        self.origins[bound] = origin

    def _hoist(self, node: ast.Import | ast.ImportFrom, name: str) -> None:
        """Record an absolute import for the bundle's header, refusing packages a diffusers install may lack."""
        for module in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]:
            root = module.split(".")[0]
            if root not in ALLOWED_IMPORTS and root not in sys.stdlib_module_names:
                raise BundleError(
                    f"{name}.py imports {module!r}, which a machine with only diffusers may lack; the remote-code "
                    f"modules may import the standard library and {sorted(ALLOWED_IMPORTS)}"
                )
        for alias in node.names:
            if isinstance(node, ast.Import):
                single, origin = ast.Import([alias]), alias.name if alias.asname else alias.name.split(".")[0]
            else:
                single, origin = ast.ImportFrom(node.module, [alias], 0), f"{node.module}.{alias.name}"
            bound = alias.asname or alias.name.split(".")[0]
            self._bind(bound, origin, name)
            self.statements.add((bound, ast.unparse(single)))

    def _inline(self, node: ast.ImportFrom, name: str) -> list[str]:
        """Lines replacing a relative import whose target's text is already in the bundle."""
        if node.level != 1:
            raise BundleError(f"{name}.py line {node.lineno}: only single-dot relative imports can be bundled")
        lines = []
        if node.module is None:
            raise BundleError(
                f"{name}.py line {node.lineno}: `from . import ...` cannot be bundled; import the names (from .x import a)"
            )
        if node.module in self.external_modules:  # from the scheduler module the pipeline module imports
            for alias in node.names:
                if alias.name not in self.external_names:
                    raise BundleError(f"{name}.py imports {alias.name!r} from .{node.module}, which does not define it")
                if alias.asname and alias.asname != alias.name:
                    raise BundleError(f"{name}.py line {node.lineno}: `as` in an import from .{node.module}")
                self._bind(alias.name, f"{self.external}.{alias.name}", name)
                self.imported.add(alias.name)
            return lines
        target = self.stand_ins.get(node.module, node.module)
        self._require_bundled(target, name)
        for alias in node.names:
            if self.defined.get(alias.name) != f"{target}.py":
                raise BundleError(f"{name}.py imports {alias.name!r} from .{target}, which does not define it")
            if alias.asname and alias.asname != alias.name:
                self._define(alias.asname, name)
                lines.append(
                    f"{alias.asname} = {alias.name}  # from .{node.module} import {alias.name} as {alias.asname}"
                )
        return lines

    def relative_statements(self, used: set[str] | None = None) -> list[str]:
        """The import of the external module's names (those in `used`, when given), wrapped as ruff would."""
        names = sorted(n for n in self.imported if used is None or n in used)
        if not names:
            return []
        return [f"from {self.external} import (", *(f"    {n}," for n in names), ")"]

    def _require_bundled(self, target: str, name: str) -> None:
        if target not in self.modules or self.modules.index(target) >= self.modules.index(name):
            raise BundleError(
                f"{name}.py imports .{target}, which is not bundled before it (bundle order: "
                f"{', '.join(self.modules)}); add it to the module list ahead of its users"
            )


def _top_level_names(tree: ast.Module) -> list[str]:
    return [n for node in tree.body for n in _bound_names(node) if n != "__all__"]


def _bound_names(node: ast.stmt) -> list[str]:
    """The names a top-level definition binds (imports aside)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def check_self_contained(source: str, allowed_relative: str | None = None) -> None:
    """Raise BundleError unless `source` compiles and every import in it (nested ones too) is absolute and of the
    standard library or ALLOWED_IMPORTS, or the one top-level `allowed_relative` import, as seen both by Python (ast)
    and by diffusers' regex scan of remote modules (which reads docstrings too, and would try to copy a sibling file
    for any line `from .x import y`)."""
    tree = ast.parse(source)
    allowed_nodes = {
        id(n) for n in tree.body if isinstance(n, ast.ImportFrom) and n.level and f".{n.module}" == allowed_relative
    }
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in allowed_nodes:
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = getattr(node, "level", 0) > 0 or any(
                r.split(".")[0] not in ALLOWED_IMPORTS | sys.stdlib_module_names for r in roots
            )
            if bad:
                raise BundleError(f"bundled module line {node.lineno}: `{ast.unparse(node)}` is not self-contained")
    for line in source.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith((".", "hf_ddpm")):
            if words[1] != allowed_relative:
                raise BundleError(f"diffusers would read this line as an import it cannot satisfy: {line.strip()!r}")
    compile(source, "<bundle>", "exec")


def scheduler_module_source() -> str:
    """The scheduler module: HFDDPMScheduler and what it reaches, and the names the pipeline module imports from it."""
    from . import __version__

    title = f"{SCHEDULER_CLASS} (hf_ddpm) as one self-contained module, for diffusers' trust_remote_code loading."
    whole = bundle_source(SCHEDULER_SOURCES, title, version=__version__)  # every name the pipeline might import
    imported = [
        alias.name
        for node in ast.parse(pipeline_module_source(whole)).body
        if isinstance(node, ast.ImportFrom) and node.level
        for alias in node.names
    ]
    return bundle_source(SCHEDULER_SOURCES, title, version=__version__, roots=(SCHEDULER_CLASS, *imported))


def pipeline_module_source(scheduler_source: str | None = None) -> str:
    """The pipeline module, importing from the scheduler module `scheduler_source` (generated when not given)."""
    from . import __version__

    scheduler_source = scheduler_source or scheduler_module_source()
    scheduler_module = f".scheduler.{module_name(SCHEDULER_PREFIX, scheduler_source)}"
    title = f"{PIPELINE_CLASS} (hf_ddpm) as one module, for diffusers' trust_remote_code loading."
    imports_from = (scheduler_module, SCHEDULER_SOURCES, scheduler_source)
    return bundle_source(
        PIPELINE_SOURCES,
        title,
        version=__version__,
        imports_from=imports_from,
        stand_ins=STAND_INS,
        roots=(PIPELINE_CLASS,),
    )


def module_name(prefix: str, source: str) -> str:
    """`<prefix>_<8 hex digits of the source's sha256>`: one name per distinct code (see the module docstring)."""
    return f"{prefix}_{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def remote_modules() -> dict[str, tuple[str, str]]:
    """{"pipeline": (path, source), "scheduler": (path, source)} of this package's source, each generated once; paths
    relative to a pipeline folder: "pipeline_hf_ddpm_H.py", "scheduler/scheduling_hf_ddpm_h.py"."""
    scheduler_source = scheduler_module_source()
    pipeline_source = pipeline_module_source(scheduler_source)
    return {
        "pipeline": (f"{module_name(PIPELINE_PREFIX, pipeline_source)}.py", pipeline_source),
        "scheduler": (f"scheduler/{module_name(SCHEDULER_PREFIX, scheduler_source)}.py", scheduler_source),
    }


def remote_files() -> dict[str, str]:
    """{"pipeline": "pipeline_hf_ddpm_H.py", "scheduler": "scheduler/scheduling_hf_ddpm_h.py"} for this source."""
    return {key: path for key, (path, _) in remote_modules().items()}


def add_remote_code(directory: str | Path) -> list[str]:
    """Write the remote-code modules into a saved pipeline directory and name them in its model_index.json.

    Idempotent; modules written by another version of this code are replaced. Returns the written paths relative
    to `directory`. The scheduler module is always written (the pipeline module imports it); model_index.json names
    it as the scheduler only when the pipeline's scheduler is an HFDDPMScheduler (a diffusers one needs no code).
    """
    directory = Path(directory)
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{directory} holds no model_index.json: save the pipeline with save_pretrained first")
    index = json.loads(index_path.read_text())
    class_name = index["_class_name"][1] if isinstance(index["_class_name"], list) else index["_class_name"]
    if class_name != PIPELINE_CLASS:
        raise ValueError(f"{directory} holds a {class_name}, not an {PIPELINE_CLASS}; it needs no hf_ddpm code")
    for stale in [*directory.glob(f"{PIPELINE_PREFIX}_*.py"), *directory.glob(f"scheduler/{SCHEDULER_PREFIX}_*.py")]:
        stale.unlink()
    written = []
    scheduler = index.get("scheduler")
    ours = isinstance(scheduler, list) and scheduler[1] == SCHEDULER_CLASS
    modules = remote_modules()  # the scheduler module is always written: the pipeline module imports it
    for key, class_name, (path, source) in (
        ("_class_name", PIPELINE_CLASS, modules["pipeline"]),
        ("scheduler" if ours else None, SCHEDULER_CLASS, modules["scheduler"]),
    ):
        (directory / path).parent.mkdir(exist_ok=True)
        (directory / path).write_text(source, encoding="utf-8")
        if key is not None:
            index[key] = [Path(path).stem, class_name]
        written.append(path)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written
