"""hf_ddpm.cpu: the programs the package owns tune their process (threads, glibc's allocator), importing the library
does not, a user's own allocator choice wins, and the numbers do not change.

Each case runs in a child process (the allocator's settings are process-wide and cannot be undone): it starts the
way the case says, then samples and scores a saved digits-sized pipeline and reports the page faults per no-grad UNet
call, the threads, and the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, cpu, unet_config

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys
import torch
start, model = sys.argv[1], sys.argv[2]
if start == "tune_process":
    from hf_ddpm.cpu import tune_process
    tune_process()
elif start == "cli":  # python -m hf_ddpm evaluate, its evaluation stubbed: what runs before it is the entry's own
    import hf_ddpm.evaluation.run
    hf_ddpm.evaluation.run.evaluate = lambda args: None
    from hf_ddpm.cli import main
    assert main(["evaluate", model, "--num_threads", sys.argv[3]]) == 0
elif start == "generate":  # the example itself, run once for real, then the probe in the same process
    import runpy
    generate = runpy.run_path(sys.argv[3])
    generate["main"]([model, "--out", sys.argv[4], "--num_images", "1", "--steps", "1"])
elif start == "app":  # the Space's main up to building the demo
    import runpy
    app = runpy.run_path(sys.argv[3])
    class Built(Exception): pass
    def build_demo(model): raise Built
    app["main"].__globals__["build_demo"] = build_demo
    try:
        app["main"]([])
    except Built:
        pass
elif start == "train":  # the training entry (every rank runs it), stopped once it has started up
    import hf_ddpm.training.main as training_main
    def stop(given): raise SystemExit(0)
    training_main.check_run = stop
    assert training_main.main(["--output_dir", sys.argv[3]]) == 0
else:
    assert start == "library"
from hf_ddpm import HFDDPMPipeline
pipe = HFDDPMPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    x, t = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((64,), 10)
    for _ in range(3):  # warm-up: tuned, the first calls still map the buffers that later calls reuse
        pipe.unet(x, t)
    # untuned, glibc's dynamic threshold spares a call now and then: the mean of 8 calls keeps the two apart
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        pipe.unet(x, t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
samples = pipe(batch_size=64, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np").images
images = torch.from_numpy((samples[:8] * 255).round().astype("uint8")).permute(0, 3, 1, 2)
bpd = pipe.bits_per_dim(images, generator=torch.Generator().manual_seed(0))
print(json.dumps({"faults_per_call": faults, "threads": torch.get_num_threads(), "samples": samples.tolist(),
                  "bits_per_dim": bpd.bits_per_dim.tolist()}))
"""


@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory) -> Path:
    """digits-16-tiny at 16x16, T = 20: the default model's activations, a short chain."""
    path = tmp_path_factory.mktemp("cpu_tuning") / "pipeline"
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("digits-16-tiny"))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=20)).save_pretrained(path)
    return path


def probe(start: str, model: Path, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "OMP_NUM_THREADS")}  # fmt: skip
    environ = {**clean, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, start, str(model), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def untuned(digits_pipeline) -> dict:
    return probe("library", digits_pipeline)


def test_importing_the_library_leaves_the_allocator_alone_and_the_cli_tunes_it(digits_pipeline, untuned):
    tuned = probe("cli", digits_pipeline, "1")
    # glibc's defaults refault a batch-64 forward's activations on every call (thousands of 4 KiB pages); tuned, the
    # freed buffers are reused
    assert untuned["faults_per_call"] > 2000 and tuned["faults_per_call"] < untuned["faults_per_call"] / 5
    assert tuned["threads"] == 1
    # the same numbers, bit for bit: the allocator changes where buffers live, not what is computed
    assert tuned["samples"] == untuned["samples"] and tuned["bits_per_dim"] == untuned["bits_per_dim"]


def test_a_users_own_malloc_setting_wins(digits_pipeline, untuned):
    # MALLOC_ARENA_MAX says nothing about thresholds: had the entry tuned anyway, the faults would drop
    own = probe("cli", digits_pipeline, "1", MALLOC_ARENA_MAX="4")
    assert own["faults_per_call"] > 2000  # thousands of refaults per call, as untuned (tuned: a few hundred at most)
    assert own["samples"] == untuned["samples"]


@pytest.mark.slow
def test_training_the_examples_and_the_space_tune_their_process(digits_pipeline, untuned, tmp_path):
    generate = probe("generate", digits_pipeline, str(REPO / "examples" / "generate.py"), str(tmp_path / "g.png"))
    app = probe("app", digits_pipeline, str(REPO / "examples" / "gradio_space" / "app.py"))
    train = probe("train", digits_pipeline, str(tmp_path / "run"))
    library = probe("tune_process", digits_pipeline)
    assert not (tmp_path / "run").exists()  # stopped before it wrote anything
    for tuned in (generate, app, train, library):
        assert tuned["faults_per_call"] < untuned["faults_per_call"] / 5
        assert tuned["samples"] == untuned["samples"] and tuned["bits_per_dim"] == untuned["bits_per_dim"]


def test_the_users_choice_is_read_from_malloc_variables_tunables_and_ld_preload():
    assert cpu.user_allocator_choice({}) is None
    assert cpu.user_allocator_choice({"MALLOC_TRIM_THRESHOLD_": "0", "PATH": "/bin"}) == "MALLOC_TRIM_THRESHOLD_"
    assert cpu.user_allocator_choice({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "GLIBC_TUNABLES"
    assert cpu.user_allocator_choice({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"}) is None
    assert cpu.user_allocator_choice({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert cpu.user_allocator_choice({"LD_PRELOAD": " "}) is None


def test_no_mallopt_under_a_users_choice_or_another_c_library(monkeypatch):
    def no_libc(*args):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(cpu.ctypes, "CDLL", no_libc)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert cpu.tune_allocator() == "allocator left to the user's LD_PRELOAD"
    monkeypatch.delenv("LD_PRELOAD")
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(cpu, "glibc_version", lambda: None)
    assert cpu.tune_allocator() == "allocator left alone (the C library is not glibc)"


def test_glibc_is_recognised_here():
    version = cpu.glibc_version()
    assert version is not None and version[0].isdigit() and "." in version  # Debian's glibc, e.g. "2.36"


def test_threads_policy_explicit_environment_and_default(monkeypatch):
    threads = torch.get_num_threads()
    try:
        assert cpu.set_threads(2) == (2, "--num_threads") and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)  # what torch reads from OMP_NUM_THREADS at start-up
        assert cpu.set_threads(None) == (3, "OMP_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
        assert cpu.set_threads(None) == (1, "default for 2 usable CPUs")
        monkeypatch.setattr(cpu, "usable_cpus", lambda: 16)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert cpu.default_threads() == 4  # the machine's CPUs divided among its processes
        with pytest.raises(ValueError, match="--num_threads must be at least 1, got 0"):
            cpu.set_threads(0)
    finally:
        torch.set_num_threads(threads)


def test_evaluate_takes_num_threads_and_refuses_a_bad_count_before_any_work(monkeypatch, capsys):
    import hf_ddpm.evaluation.run
    from hf_ddpm.cli import main

    asked, evaluated = [], []
    monkeypatch.setattr(hf_ddpm.evaluation.run, "evaluate", evaluated.append)
    monkeypatch.setattr(cpu, "tune_process", asked.append)
    assert main(["evaluate", "some/model", "--num_threads", "3"]) == 0
    assert asked == [3] and evaluated[0].num_threads == 3
    monkeypatch.undo()
    monkeypatch.setattr(hf_ddpm.evaluation.run, "evaluate", evaluated.append)
    assert main(["evaluate", "some/model", "--num_threads", "0"]) == 1
    assert "--num_threads must be at least 1, got 0" in capsys.readouterr().err and len(evaluated) == 1
