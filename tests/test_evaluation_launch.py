"""`python -m hf_ddpm evaluate` as real processes: one process and two (`ACCELERATE_USE_CPU=1 accelerate launch
--multi_gpu --num_processes 2`) give the same numbers; a sampling run killed after some shards and started again
(on two processes) draws only the missing shards and ends with the numbers of an uninterrupted run; a 2-process evaluate
closes its process group before it exits. The feature extractor is the stand-in of tests/evaluation_stand_in.py (the
real Inception run is in test_evaluation_inception.py, slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from evaluation_stand_in import PixelFeatures

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.cli import build_parser
from hf_ddpm.evaluation.run import evaluate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "evaluation_stand_in.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
T, SIZE = 50, 16


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluation_launch") / "pipeline"
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


def command(processes: int, *argv) -> list[str]:
    if processes == 1:
        return [sys.executable, str(SCRIPT), *map(str, argv)]
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    return [
        *launch,
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(SCRIPT),
        *map(str, argv),
    ]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "ACCELERATE_USE_CPU": "1"}  # fmt: skip


def run(processes: int, *argv) -> subprocess.CompletedProcess:
    result = subprocess.run(command(processes, *argv), env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_and_two_processes_give_the_same_numbers(pipeline_dir, tmp_path):
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"metrics-{processes}.json"
        argv = [pipeline_dir, "--num_images", 7, "--num_timesteps", 3, "--batch_size", 2, "--num_samples", 7,
                "--num_inference_steps", 4, "--reference_count", 24, "--sample_dir", tmp_path / f"samples-{processes}",
                "--reference_cache_dir", tmp_path / f"cache-{processes}", "--metrics_out", out]  # fmt: skip
        result = run(processes, *argv)
        assert result.stdout.count("wrote ") == 1  # only the main process reports
        outputs[processes] = json.loads(out.read_text())
        # the reference's 24 images and the 7 samples went through the extractor once, shared among processes
        seen = [int(n) for n in re.findall(r"stand-in feature extractor: (\d+) images", result.stdout)]
        assert len(seen) == processes and sum(seen) == 24 + 7
        # progress bars from the main process only, counting its own share: the 24 reference images are one block;
        # of the 7 samples in shards of 2, it takes shards 0 and 2 (4 images) of two processes
        done = {what: set(re.findall(rf"{what}: 100%.*?\| (\d+/\d+)", result.stderr)) for what in ("reference statistics", "sample features")}  # fmt: skip
        assert done == {"reference statistics": {"24/24"}, "sample features": {"7/7" if processes == 1 else "4/4"}}
    one, two = outputs[1], outputs[2]
    assert sorted(one) == ["bits_per_dim", "fid", "kid", "precision", "recall"]
    assert one["bits_per_dim"]["count"] == two["bits_per_dim"]["count"] == 7
    assert two["bits_per_dim"]["value"] == pytest.approx(one["bits_per_dim"]["value"], rel=1e-9)
    assert two["bits_per_dim"]["stderr"] == pytest.approx(one["bits_per_dim"]["stderr"], rel=1e-9)
    for name in ("fid", "precision", "recall", "kid"):
        assert two[name]["value"] == pytest.approx(one[name]["value"], rel=1e-9, abs=1e-12), name
        assert two[name]["count"] == 7
    for j in range(4):  # the same samples, whichever process drew them
        a, b = (np.load(tmp_path / f"samples-{p}" / f"shard-{j:05d}.npz")["images"] for p in (1, 2))
        np.testing.assert_array_equal(a, b)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (torch's launcher starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def shards(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.glob("shard-*.npz"))}


def test_a_killed_sampling_run_started_again_draws_only_the_missing_shards(pipeline_dir, tmp_path):
    argv = [pipeline_dir, "--num_images", 0, "--batch_size", 2, "--num_samples", 24, "--num_inference_steps", 10,
            "--reference_count", 16, "--reference_cache_dir", tmp_path / "cache"]  # fmt: skip
    sample_dir = tmp_path / "samples"
    process = subprocess.Popen(
        command(1, *argv, "--sample_dir", sample_dir), env=environment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(shards(sample_dir)) < 1 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        tree = [process.pid, *descendants(process.pid)]  # the launcher and its workers (in their own sessions)
        for pid in reversed(tree):  # workers first, at once: no one draws a shard after this
            os.kill(pid, signal.SIGKILL)
        process.wait()
    before = shards(sample_dir)
    assert 1 <= len(before) < 12, f"the run was not stopped midway: {len(before)} of 12 shards"
    out = tmp_path / "resumed.json"
    resumed = run(2, *argv, "--sample_dir", sample_dir, "--metrics_out", out)
    assert f"samples: {12 - len(before)} of 12 shards drawn now" in resumed.stdout, resumed.stdout
    after = shards(sample_dir)
    assert len(after) == 12 and {k: after[k] for k in before} == before  # the finished shards were not drawn again

    # the numbers of an uninterrupted run (here in this process)
    args = build_parser().parse_args(["evaluate", *map(str, argv), "--sample_dir", str(tmp_path / "whole")])
    whole = {m.name: m.value for m in evaluate(args, extractor=PixelFeatures())}
    resumed_metrics = json.loads(out.read_text())
    assert sorted(whole) == sorted(resumed_metrics) == ["fid", "kid", "precision", "recall"]
    for name, value in whole.items():
        assert resumed_metrics[name]["value"] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_likelihood_beyond_the_bound_is_the_same_on_one_and_two_processes(pipeline_dir, tmp_path):
    """Each process integrates its own images' probability-flow ODEs with its own adaptive steps (no collective
    inside), so the ODE and importance-weighted numbers do not depend on the process count."""
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"likelihood-{processes}.json"
        run(processes, pipeline_dir, "--num_images", 5, "--batch_size", 2, "--likelihood", "ode,iw", "--iw_samples", 2,
            "--rtol", "1e-3", "--atol", "1e-3", "--likelihood_dir", tmp_path / f"blocks-{processes}",
            "--metrics_out", out)  # fmt: skip
        outputs[processes] = json.loads(out.read_text())
    for name in ("bits_per_dim_ode", "bits_per_dim_iw"):
        one, two = outputs[1][name], outputs[2][name]
        assert one["count"] == two["count"] == 5
        assert two["value"] == pytest.approx(one["value"], rel=1e-9) and two["stderr"] == pytest.approx(
            one["stderr"], rel=1e-9
        )
    assert outputs[1]["bits_per_dim_ode"]["nfe_per_image"] == outputs[2]["bits_per_dim_ode"]["nfe_per_image"]


@pytest.mark.slow  # three runs of six ODE integrations: about two minutes here
def test_a_killed_ode_likelihood_run_started_again_integrates_only_the_missing_blocks(
    pipeline_dir, tmp_path, one_thread
):
    argv = [pipeline_dir, "--num_images", 6, "--batch_size", 1, "--likelihood", "ode", "--rtol", "1e-3", "--atol",
            "1e-3", "--likelihood_dir", tmp_path / "blocks"]  # fmt: skip
    blocks = tmp_path / "blocks" / "ode"
    process = subprocess.Popen(command(1, *argv), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(blocks.glob("block-*.npz"))) < 1 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for pid in reversed([process.pid, *descendants(process.pid)]):
            os.kill(pid, signal.SIGKILL)
        process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in sorted(blocks.glob("block-*.npz"))}
    assert 1 <= len(before) < 6, f"the run was not stopped midway: {len(before)} of 6 blocks"
    out = tmp_path / "resumed.json"
    run(2, *argv, "--metrics_out", out)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(blocks.glob("block-*.npz"))}
    assert len(after) == 6 and {k: after[k] for k in before} == before  # the finished blocks were not redone
    args = build_parser().parse_args(["evaluate", *map(str, argv[:-1]), str(tmp_path / "whole")])
    whole = evaluate(args)[0]  # with one thread, as the launched processes (a thread count moves the last bits)
    resumed = json.loads(out.read_text())["bits_per_dim_ode"]
    assert resumed["value"] == pytest.approx(whole.value, rel=1e-9) and resumed["count"] == 6


@pytest.mark.slow  # one more 2-process launch
def test_a_two_process_evaluate_closes_its_process_group_before_it_exits(pipeline_dir, tmp_path):
    """`python -m hf_ddpm evaluate` (hf_ddpm.cli.main) leaves no process group to the interpreter's exit, where
    gloo's threads can abort it ("terminate called without an active exception"): checked in each process after
    main returns, as the exit would find it."""
    script = tmp_path / "evaluate_then_check.py"
    script.write_text(
        "import sys\nimport torch.distributed\nfrom hf_ddpm.cli import main\n"
        "code = main(['evaluate', *sys.argv[1:]])\n"
        # one write per process: two processes share the pipe, and print's pieces could interleave
        "sys.stdout.write(f'process group open at exit: {torch.distributed.is_initialized()}\\n')\n"
        "sys.stdout.flush()\nsys.exit(code)\n"
    )
    argv = [pipeline_dir, "--num_images", 2, "--num_timesteps", 2, "--num_samples", 0]
    launch = command(2, *argv)
    launch[launch.index(str(SCRIPT))] = str(script)
    result = subprocess.run(launch, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("process group open at exit: False") == 2, result.stdout[-3000:]
