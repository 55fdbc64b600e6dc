"""The remote-code modules a pushed repo carries (hf_ddpm/remote_code.py) and HFDDPMPipeline.from_pretrained's own
loading (hf_ddpm/loading.py), in process and without a Hub: the modules are generated from the current source, are
self-contained as diffusers sees them, behave exactly as the package, and the bundler refuses what it cannot bundle.
"""

import ast
import importlib.machinery
import importlib.util
import io
import json
import re
import sys
import tokenize

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils.dynamic_modules_utils import get_relative_imports

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.bundler import ALLOWED_IMPORTS, RULES, BundleError, bundle_source
from hf_ddpm.hub import save_hub_pipeline
from hf_ddpm.remote_code import (
    BUNDLE_BUDGET_BYTES,
    PIPELINE_SOURCES,
    SCHEDULER_SOURCES,
    add_remote_code,
    pipeline_module_source,
    remote_files,
    scheduler_module_source,
)
from hf_ddpm.shipped import PACKAGE_DIR

T = 30


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pipe(**scheduler_kwargs):
    torch.manual_seed(0)
    unet = UNet2DModel(
        **unet_config("test-tiny", learned_variance=scheduler_kwargs.get("variance_type") == "learned_range")
    )
    pipe = HFDDPMPipeline(unet.eval(), HFDDPMScheduler(num_train_timesteps=T, **scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps=T, seed=3):
    return pipe(batch_size=2, generator=torch.manual_seed(seed), num_inference_steps=steps, output_type="pt").images


def import_file(path, name):
    """The module at `path`, imported as `<name>.<file stem>` of a package rooted at its folder, as diffusers does:
    the pipeline module's `from .scheduler.<module> import ...` then finds the scheduler module."""
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    package.__path__ = [str(path.parent)]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.{path.stem}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    pipe = make_pipe(variance_type="fixed_large", timestep_spacing="trailing")
    written = save_hub_pipeline(pipe, directory)
    return directory, written


def test_saved_modules_are_generated_from_the_current_source(saved):
    directory, written = saved
    pipeline_file, scheduler_file = written
    assert (directory / pipeline_file).read_text() == pipeline_module_source()
    assert (directory / scheduler_file).read_text() == scheduler_module_source()
    assert written == list(remote_files().values()) and re.fullmatch(r"pipeline_hf_ddpm_[0-9a-f]{8}\.py", pipeline_file)
    assert re.fullmatch(r"scheduler/scheduling_hf_ddpm_[0-9a-f]{8}\.py", scheduler_file)
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == [pipeline_file[:-3], "HFDDPMPipeline"]
    assert index["scheduler"] == [scheduler_file[10:-3], "HFDDPMScheduler"] and index["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    assert not list(directory.rglob("*.bin")) and (directory / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def without_docstrings(node):
    """`node` as ast.dump shows it, with every docstring removed (the bundles cut them to their first paragraph)."""
    node = ast.parse(ast.unparse(node)).body[0]
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                inner.body = body[1:] or [ast.Pass()]
    return ast.dump(node)


def reached_from_the_bundled_classes():
    """{module: {name: node}} of the bundled modules' top-level definitions that HFDDPMPipeline and HFDDPMScheduler
    reach: a fixed point over the names each definition's node mentions. The pipeline's modules read a name first
    among their own definitions, then the scheduler's (which they import); a stand-in answers to the names of the
    module it replaces, and `from .x import a as b` makes b reach a."""
    groups = {"scheduler": {}, "pipeline": {}}  # group -> {name: (module, node or None, names it mentions)}
    for group, sources in (("scheduler", SCHEDULER_SOURCES), ("pipeline", PIPELINE_SOURCES)):
        for module in sources:
            for node in ast.parse((PACKAGE_DIR / f"{module}.py").read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    bound = [node.name]
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    bound = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                else:  # imports, and the module's docstring: nothing else runs at import
                    assert isinstance(node, (ast.Import, ast.ImportFrom)) or ast.get_docstring(
                        ast.Module([node], [])
                    ), ast.dump(node)[:80]
                    if isinstance(node, ast.ImportFrom) and node.level:
                        for alias in node.names:
                            if alias.asname and alias.asname != alias.name:
                                groups[group][alias.asname] = (module, None, {alias.name})
                    continue
                for name in bound:
                    assert name not in groups[group], f"{name} defined twice in the {group} module"
                    groups[group][name] = (module, node, {n.id for n in ast.walk(node) if isinstance(n, ast.Name)})
    reached, todo = set(), [("pipeline", "HFDDPMPipeline"), ("scheduler", "HFDDPMScheduler")]
    while todo:
        group, name = todo.pop()
        if group == "pipeline" and name not in groups["pipeline"]:
            group = "scheduler"
        if name in groups[group] and (group, name) not in reached:
            reached.add((group, name))
            todo.extend((group, n) for n in groups[group][name][2])
    by_module = {}
    for group, name in reached:
        module, node, _ = groups[group][name]
        if node is not None:
            by_module.setdefault(module, {})[name] = node
    return by_module


@pytest.mark.parametrize(
    ("make_source", "sources"),
    [(pipeline_module_source, PIPELINE_SOURCES), (scheduler_module_source, SCHEDULER_SOURCES)],
)
def test_bundle_holds_every_definition_its_classes_reach_and_no_other_with_the_same_code(make_source, sources):
    bundle = make_source()
    tree = ast.parse(bundle)
    bundled = {without_docstrings(node) for node in tree.body}
    reached = reached_from_the_bundled_classes()
    expected = set()
    for name in sources:
        for bound, node in reached.get(name, {}).items():
            expected.add(bound)
            assert without_docstrings(node) in bundled, f"{name}.py: {ast.dump(node)[:80]}"
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node, clean=False):
                first_paragraph = ast.get_docstring(node, clean=False).split("\n\n")[0]
                assert first_paragraph in bundle, f"{name}.py: {node.name}"
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))} | {
        n.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for n in ast.walk(t)
        if isinstance(n, ast.Name)
    }
    aliases = {"estimate_log_likelihood"} if make_source is pipeline_module_source else set()  # `import ... as`
    assert defined == expected | aliases  # nothing unreachable is bundled (make_grid, the paper's endpoints, ...)
    assert "make_grid" not in bundle and "paper_linear_endpoints" not in bundle
    assert "class HFDDPMPipeline(DiffusionPipeline)" in bundle or "class HFDDPMScheduler(" in bundle


def test_a_repo_carries_one_scheduler_and_its_code_within_the_budget(saved):
    """BUNDLE_BUDGET_BYTES (remote_code.py says why: diffusers imports this code at every load), measured with the
    bundler's first-paragraph docstrings; met by bundling less, never by trimming the package's documentation."""
    directory, written = saved
    sizes = {name: (directory / name).stat().st_size for name in written}
    assert sum(sizes.values()) <= min(60_000, BUNDLE_BUDGET_BYTES), sizes
    classes = [
        (name, node.name)
        for name in written
        for node in ast.walk(ast.parse((directory / name).read_text()))
        if isinstance(node, ast.ClassDef)
    ]
    assert [c for c in classes if c[1] == "HFDDPMScheduler"] == [(written[1], "HFDDPMScheduler")]
    assert "SimpleNamespace" not in "".join((directory / name).read_text() for name in written)
    for name in written:  # the bundler's rules head each bundled module
        assert "keep top-level names unique across the" in (directory / name).read_text().split("from __future__")[0]


def test_a_bundle_holds_no_comments_but_its_header_and_section_lines(saved):
    """Comments are dropped like docstrings' later paragraphs (the full text is in the package); the bundler's rules
    above `from __future__` and the `# ---- hf_ddpm/<module>.py` line opening each module's section stay."""
    directory, written = saved
    for name in written:
        text = (directory / name).read_text()
        header_rows = text[: text.index("from __future__")].count("\n")
        comments = [
            (token.start, token.line)
            for token in tokenize.generate_tokens(io.StringIO(text).readline)
            if token.type == tokenize.COMMENT
        ]
        assert "".join(line for (row, _), line in comments if row <= header_rows) == RULES + "\n", name
        sections = [line for (row, col), line in comments if row > header_rows and col == 0]
        assert len(sections) == len(comments) - len(RULES.splitlines()), [c for c in comments if c[1] not in sections]
        assert all(re.fullmatch(r"# -{40} hf_ddpm/\w+\.py\n", line) for line in sections), sections
        assert len(sections) == text.split('"""', 2)[1].count(".py sha256:") >= 3  # one per bundled module


@pytest.mark.parametrize("source", [pipeline_module_source, scheduler_module_source])
def test_bundle_imports_only_what_a_diffusers_install_has(source, tmp_path):
    path = tmp_path / "module.py"
    path.write_text(source())
    scheduler_module = remote_files()["scheduler"].removesuffix(".py").replace("/", ".")
    expected = [scheduler_module] if source is pipeline_module_source else []
    assert get_relative_imports(path) == expected  # diffusers' own scan (which also reads docstrings)
    tree = ast.parse(source())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert [(n.module, n in tree.body) for n in relative] == [(m, True) for m in expected]  # only that one, on top
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in relative:
            assert getattr(node, "level", 0) == 0
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert all(r.split(".")[0] in ALLOWED_IMPORTS | sys.stdlib_module_names for r in roots), ast.unparse(node)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_bundled_classes_sample_and_bound_exactly_as_the_package(saved, variance_type):
    directory, _ = saved
    pipeline_file, scheduler_file = remote_files().values()
    bundled = import_file(directory / pipeline_file, f"bundled_pipeline_{variance_type}")
    scheduling = import_file(directory / scheduler_file, f"bundled_scheduler_{variance_type}")
    ours = make_pipe(variance_type=variance_type)
    config = dict(ours.scheduler.config)
    for pipe_class, scheduler_class in ((bundled.HFDDPMPipeline, scheduling.HFDDPMScheduler),
                                        (bundled.HFDDPMPipeline, bundled.HFDDPMScheduler)):  # fmt: skip
        theirs = pipe_class(ours.unet, scheduler_class.from_config(config))
        theirs.set_progress_bar_config(disable=True)
        assert torch.equal(sample(theirs, steps=10), sample(ours, steps=10))
        images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        a = theirs.bits_per_dim(images, num_timesteps=3, generator=torch.manual_seed(1)).bits_per_dim
        b = ours.bits_per_dim(images, num_timesteps=3, generator=torch.manual_seed(1)).bits_per_dim
        assert torch.equal(a, b)


def test_bundled_pipeline_loads_a_saved_folder_with_its_own_from_pretrained(saved):
    directory, _ = saved
    bundled = import_file(directory / remote_files()["pipeline"], "bundled_pipeline_loading")
    loaded = bundled.HFDDPMPipeline.from_pretrained(directory)
    assert type(loaded.scheduler) is bundled.HFDDPMScheduler and loaded.scheduler.config.variance_type == "fixed_large"
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(
        sample(loaded, steps=6), sample(make_pipe(variance_type="fixed_large", timestep_spacing="trailing"), steps=6)
    )


def test_diffusers_loads_the_folder_only_with_trust_remote_code(saved):
    directory, _ = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(directory)
    remote = DiffusionPipeline.from_pretrained(directory, trust_remote_code=True)
    assert type(remote).__name__ == "HFDDPMPipeline" and type(remote).__module__.endswith(
        remote_files()["pipeline"][:-3]
    )
    remote.set_progress_bar_config(disable=True)
    assert torch.equal(sample(remote, steps=6), sample(HFDDPMPipeline.from_pretrained(directory), steps=6))


def test_add_remote_code_is_idempotent_and_only_for_hf_ddpm_pipelines(saved, tmp_path):
    directory, _ = saved
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    add_remote_code(directory)
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    # modules written by another version of hf_ddpm are replaced, not left beside the current ones
    (directory / "pipeline_hf_ddpm_0badc0de.py").write_text("old = 1\n")
    (directory / "scheduler" / "scheduling_hf_ddpm_0badc0de.py").write_text("old = 1\n")
    add_remote_code(directory)
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    # an HFDDPMPipeline whose scheduler is diffusers' own: only the pipeline module, the scheduler stays diffusers'
    pipe = make_pipe()
    HFDDPMPipeline(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)).save_pretrained(tmp_path / "theirs")
    assert add_remote_code(tmp_path / "theirs") == list(remote_files().values())  # the pipeline imports both
    assert json.loads((tmp_path / "theirs" / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "DDPMScheduler",
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="holds a DDPMPipeline, not an HFDDPMPipeline"):
        add_remote_code(tmp_path / "other")


def write_package(directory, **modules):
    directory.mkdir(exist_ok=True)
    for name, text in modules.items():
        (directory / f"{name}.py").write_text(text)
    return directory


def test_bundler_inlines_named_relative_imports(tmp_path):
    package = write_package(
        tmp_path / "pkg",
        a='"""a"""\nfrom __future__ import annotations\nimport math\n\nSCALE = 2.0\n\ndef double(x):\n    return SCALE * x\n',
        b="from .a import double\nfrom .a import double as twice\nimport math\n\ndef f(x):\n    return double(x) + twice(math.pi)\n",
    )
    source = bundle_source(("a", "b"), "test bundle", package_dir=package)
    namespace = {}
    exec(compile(source, "bundle", "exec"), namespace)
    assert namespace["f"](1.0) == 2.0 + 2.0 * np.pi
    assert source.count("import math") == 1 and source.index("from __future__") < source.index("import math")


def test_bundler_with_roots_keeps_what_they_reach_through_decorators_bases_defaults_and_aliases(tmp_path):
    package = write_package(
        tmp_path / "pkg",
        a=(
            "import functools\nimport math\nimport json\n\nSCALE = 2.0\nUNUSED = json.dumps({})\n\n"
            "def deco(f):\n    return functools.wraps(f)(f)\n\n\nclass Base:\n    pass\n\n\n"
            "def default():\n    return 1\n\n\n# a helper nothing reaches\ndef orphan():\n    return math.pi\n"
        ),
        b=(
            "from .a import SCALE, Base, deco, default\nfrom .a import orphan as twice\n\n\n"
            "class Root(Base):\n    @deco\n    def f(self, x=default()):\n        return SCALE * x\n\n\n"
            "def other():\n    return twice()\n"
        ),
    )
    source = bundle_source(("a", "b"), "test bundle", package_dir=package, roots=("Root",))
    namespace = {}
    exec(compile(source, "bundle", "exec"), namespace)
    assert namespace["Root"]().f() == 2.0 and issubclass(namespace["Root"], namespace["Base"])
    for gone in ("orphan", "twice", "other", "UNUSED", "import json", "import math", "nothing reaches"):
        assert gone not in source, gone
    assert "import functools" in source
    with pytest.raises(BundleError, match=r"bundle roots \['Missing'\] are defined by none of the modules"):
        bundle_source(("a", "b"), "test bundle", package_dir=package, roots=("Missing",))


def test_bundler_points_imports_of_another_bundle_at_it_and_cuts_docstrings(tmp_path):
    package = write_package(
        tmp_path / "pkg",
        a="SCALE = 2.0\n",
        b='def f(x):\n    """Twice x.\n\n    A second paragraph, in the package only.\n    """\n    return SCALE * x\n',
    )
    (package / "b.py").write_text("from .a import SCALE\n\n" + (package / "b.py").read_text())
    source = bundle_source(
        ("b",), "test bundle", package_dir=package, imports_from=(".other.mod", ("a",), "SCALE = 2\n")
    )
    assert "from .other.mod import (\n    SCALE,\n)" in source
    assert '"""Twice x."""' in source and "second paragraph" not in source
    with pytest.raises(BundleError, match="imports 'SCALE' from .a, which does not define it"):
        bundle_source(("b",), "test bundle", package_dir=package, imports_from=(".other.mod", ("a",), "OTHER = 1\n"))


def test_bundler_reads_an_import_of_a_module_left_out_as_one_of_its_stand_in(tmp_path):
    """How the pipeline module imports hub.py and loading.py, and gets standalone.py's functions in the bundle."""
    package = write_package(
        tmp_path / "pkg",
        stand_in="def publish(x):\n    return f'standalone {x}'\n",
        user="from .publishing import publish\n\ndef f(x):\n    return publish(x)\n",
    )
    source = bundle_source(
        ("stand_in", "user"), "test bundle", package_dir=package, stand_ins={"publishing": "stand_in"}
    )
    namespace = {}
    exec(compile(source, "bundle", "exec"), namespace)
    assert namespace["f"](3) == "standalone 3" and "publishing" not in source.split('"""', 2)[2].split("def ")[0]
    (package / "user.py").write_text("from .publishing import push\n")
    with pytest.raises(BundleError, match="imports 'push' from .stand_in, which does not define it"):
        bundle_source(("stand_in", "user"), "test bundle", package_dir=package, stand_ins={"publishing": "stand_in"})


def test_the_bundled_pipeline_answers_publishing_with_the_stand_ins_and_never_imports_hf_ddpm(saved):
    """pipeline.py imports save_pipeline/push_pipeline from hub.py, load_components from loading.py and the likelihood
    estimators from evaluation/likelihood.py; its bundled copy gets standalone.py's, which take the same names (the
    publishing and the estimators refused), and no line of the bundle names hf_ddpm's modules."""
    directory, _ = saved
    bundled = import_file(directory / remote_files()["pipeline"], "bundled_pipeline_stand_ins")
    for name in ("save_pipeline", "push_pipeline", "load_components", "log_likelihood"):
        assert getattr(bundled, name).__module__ == bundled.__name__
    loaded = bundled.HFDDPMPipeline.from_pretrained(directory)
    with pytest.raises(RuntimeError, match="needs hf_ddpm installed"):
        loaded.push_to_hub("test-user/x")
    with pytest.raises(RuntimeError, match=r"log_likelihood\(method='ode'\) needs hf_ddpm installed"):
        loaded.log_likelihood(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "ode")
    assert "importlib" not in pipeline_module_source() and "import hf_ddpm" not in pipeline_module_source()


@pytest.mark.parametrize(("modules", "match"), [
    ({"a": "import scipy\n"}, "imports 'scipy', which a machine with only diffusers may lack"),
    ({"a": "from .c import x\n"}, r"imports \.c, which is not bundled before it"),
    ({"a": "x = 1\n", "b": "from .a import y\n"}, "imports 'y' from .a, which does not define it"),
    ({"a": "def f():\n    from .b import g\n    return g\n"}, "a relative import inside a block cannot be bundled"),
    ({"a": "def f():\n    pass\n", "b": "f = 2\n"}, "b.py defines 'f', also bound by a.py"),
    ({"a": "import numpy as f\n", "b": "import torch as f\n"}, "binds 'f' to torch, already bound by `import numpy`"),
    ({"a": '"""Usage:\nfrom .x import y\n"""\n'}, "diffusers would read this line as an import"),
    ({"a": "x = 1\n", "b": "from . import a\n"}, r"`from \. import \.\.\.` cannot be bundled; import the names"),
])  # fmt: skip
def test_bundler_refuses_what_it_cannot_bundle_exactly(tmp_path, modules, match):
    package = write_package(tmp_path / "pkg", **modules)
    with pytest.raises(BundleError, match=match):
        bundle_source(tuple(modules), "test bundle", package_dir=package)


def test_from_pretrained_passes_hub_and_model_arguments_and_refuses_pickles(saved, tmp_path):
    directory, _ = saved
    pipe = HFDDPMPipeline.from_pretrained(directory, dtype=torch.float64, local_files_only=True, trust_remote_code=True)
    assert pipe.unet.dtype == torch.float64 and pipe.config._name_or_path == str(directory)
    scheduler = HFDDPMScheduler(num_train_timesteps=7)
    assert HFDDPMPipeline.from_pretrained(directory, scheduler=scheduler).scheduler is scheduler
    with pytest.raises(TypeError, match=r"unexpected arguments \['custom_pipeline'\]"):
        HFDDPMPipeline.from_pretrained(directory, custom_pipeline="x")
    pickled = tmp_path / "pickled"
    make_pipe().save_pretrained(pickled, safe_serialization=False)
    assert not list(pickled.rglob("*.safetensors"))
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        HFDDPMPipeline.from_pretrained(pickled)
