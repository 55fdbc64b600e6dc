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
use: the package's training, evaluation and Space helpers stay out. Docstrings keep their first paragraph and
comments are dropped (the full text is in the package). hf_ddpm/bundler.py does the bundling, and refuses what
breaks its rules (which each bundled module states at its top) or imports a package outside its `ALLOWED_IMPORTS`.
The files are regenerated at every save, never kept by hand.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from .bundler import bundle_source

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
# start), so they hold the algorithm and what a loaded pipeline offers, no more. Measured as the bundler writes them
# (docstrings cut to their first paragraph, comments dropped), never by trimming the package's documentation: a
# module that outgrows it asks what else it holds. They take 56.0 KB (scheduler module 32.5 KB, pipeline module
# 23.5 KB), not the 50 KB aimed at. What holds the bytes: the docstrings' first paragraphs (~9.7 KB) and the raise
# statements, whose messages the tests pin (~5.6 KB), run through all of the following; the generated headers and
# imports (~2.6 KB); HFDDPMScheduler (~13.1 KB: the float64 forward process, posterior and step, the bound's terms,
# set_timesteps and its checks; what diffusers' DDPMScheduler computes alike is taken from it); HFDDPMPipeline
# (~8.3 KB, __call__ ~4.2 KB: any compatible scheduler, callbacks and interruption, custom timesteps, float64);
# the bound and its Monte Carlo estimate (~6.4 KB: bits_per_dim works without hf_ddpm); other schedulers' configs
# (~6 KB: scheduler_configs.py, from_config and _keys_at_default, to load theirs, swap them in and bound under
# them); the chain's coefficients and the respacing (~5.9 KB); the stand-ins' loading and saving (~3.9 KB); the
# pixel conversions (~2.8 KB). Each serves a feature a loaded pipeline offers and a test holds: the rest of the way
# to 50 KB would take cutting features or documentation. What the budget guards, the time a load spends on this
# code, is small at this size: compiled from source, the two modules import in ~13 ms on a 2-core CPU, beside
# ~6 s for torch and diffusers themselves.
BUNDLE_BUDGET_BYTES = 56_000


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
