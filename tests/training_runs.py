"""Training runs the tests start: the options of a seconds-long run (in process, `tiny`; launched, `launch_flags`),
`accelerate launch` of training/train.py in one or two processes (DDP over gloo on the CPU), and weight comparisons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def launch_flags(output_dir, *extra):
    """Options of a seconds-long launched run (`launch`): test-tiny on 8x8 digits, T = 50."""
    return [
        "--output_dir", str(output_dir), "--model_config", "test-tiny", "--resolution", "8",
        "--ddpm_num_steps", "50", "--train_batch_size", "4", "--lr_warmup_steps", "2", "--eval_size", "16",
        "--eval_num_images", "4", "--eval_num_timesteps", "2", "--eval_batch_size", "4",
        "--ddpm_num_inference_steps", "4", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(argv, num_processes=1):
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_cpu_threads_per_process",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if num_processes == 1:
        launcher += ["--cpu", "--num_processes", "1"]
    else:  # with ACCELERATE_USE_CPU=1 (below): DDP over gloo on the CPU
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    return launcher + [str(REPO / "training" / "train.py"), *argv]


def environment():
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def launch(argv, num_processes=1) -> str:
    result = subprocess.run(
        launch_command(argv, num_processes),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def tiny(output_dir, *extra, model=("--model_config", "test-tiny")):
    """Options of a seconds-long run: the test-tiny UNet on 8x8 digits, T = 50."""
    return [
        "--output_dir", str(output_dir), *model, "--resolution", "8",
        "--ddpm_num_steps", "50", "--train_batch_size", "4", "--max_train_steps", "2", "--lr_warmup_steps", "0",
        "--eval_size", "16", "--eval_num_images", "4", "--eval_num_timesteps", "2", "--eval_batch_size", "2",
        "--ddpm_num_inference_steps", "4", *extra,
    ]  # fmt: skip


def reset_accelerate() -> None:
    """accelerate's process-wide state, reset between two in-process runs (each builds its own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def weights(path):
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path, files=("unet/diffusion_pytorch_model.safetensors",)):
    for name in files:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}: {key} differs"


def scalars(output_dir, tag) -> dict:
    """{step: value} of a TensorBoard scalar the run logged."""
    (events,) = (Path(output_dir) / "logs" / "train").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def digit_shards(folder: Path, count: int = 96, shards: int = 2) -> list[str]:
    """The first `count` bundled digits (8x8 grayscale) as parquet shards: data to --stream, or to read as files."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (load_digits().images[:count] * (255 / 16)).round().astype(np.uint8)
    features = datasets.Features({"image": datasets.Image()})
    per = count // shards
    for s in range(shards):
        images = [Image.fromarray(p, mode="L") for p in pixels[s * per : (s + 1) * per]]
        datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(folder / f"{s}.parquet"))
    return sorted(str(p) for p in folder.glob("*.parquet"))
