"""`accelerate launch training/train.py` end to end, in subprocesses: a tiny run, real two-process DDP on the CPU
(gloo), and a run killed with SIGKILL after a checkpoint whose resumption ends bit-identical to an uninterrupted
run. Each run is a few seconds of training plus the start-up of accelerate and torch."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_runs import REPO, TIMEOUT, environment, launch, launch_command, launch_flags, scalars, weights

from hf_ddpm import HFDDPMPipeline


def test_a_tiny_launch_writes_a_pipeline_that_loads_and_samples(tmp_path):
    out = tmp_path / "out"
    launch(
        launch_flags(
            out,
            "--max_train_steps",
            "6",
            "--gradient_accumulation_steps",
            "2",
            "--checkpointing_steps",
            "3",
            "--checkpoints_total_limit",
            "1",
            "--save_images_steps",
            "3",
            "--eval_bits_per_dim_steps",
            "3",
        )
    )
    pipe = HFDDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()
    assert pipe.unet.config.in_channels == 1  # the preset adapted to the grayscale digits
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()  # safetensors only
    assert all(p.parent.name.startswith("checkpoint-") for p in out.rglob("*.bin"))  # only optimizer state

    assert (out / "samples.png").exists() and (out / "samples" / "step-0000003.png").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # total limit 1
    for tag in ("loss", "lr", "grad_norm", "images_per_sec"):
        assert sorted(scalars(out, tag)) == [1, 2, 3, 4, 5, 6]
    assert sorted(scalars(out, "bits_per_dim")) == [3, 6]
    (events,) = (out / "logs" / "train").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("samples")] == [3, 6]  # sample grids in TensorBoard too
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_train_steps"] == 6 and "hub_token" not in args
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["eval"]["bits_per_dim"] > 0


def test_two_process_ddp_on_cpu_keeps_replicas_identical_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "out"
    log = launch(
        launch_flags(
            out,
            "--max_train_steps",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--save_images_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--seed",
            "4294967295",  # the largest: rank 1's own seed (+ its rank) wraps at 2**32 instead of failing in numpy
        ),
        num_processes=2,
    )
    hashes = dict(re.findall(r"process (\d)/2: parameter sha256 (\w+ ema sha256 \w+)", log))
    assert set(hashes) == {"0", "1"}, log[-3000:]  # world size 2: both ranks report
    assert hashes["0"] == hashes["1"]  # identical weights and EMA weights on both replicas
    assert json.loads((out / "training_summary.json").read_text())["world_size"] == 2
    assert "Distributed environment: DistributedType.MULTI_CPU" in log

    top = sorted(p.name for p in out.iterdir())
    remote_code = [name for name in top if name.startswith("pipeline_hf_ddpm_") and name.endswith(".py")]
    assert len(remote_code) == 1  # the bundled pipeline module, so diffusers alone loads the folder
    top.remove(remote_code[0])
    assert top == [
        ".hf_ddpm-manifest.json",  # the files that were there before the run (none)
        ".hf_ddpm.lock",  # the run's lock (free once it ended)
        "checkpoint-2",
        "checkpoint-4",
        "logs",
        "model_index.json",
        "samples",
        "samples.png",
        "scheduler",
        "training_args.json",
        "training_summary.json",
        "unet",
    ]
    assert len(list((out / "logs" / "train").iterdir())) == 1  # one event file: only rank 0 logs
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png"]
    files = sorted(p.name for p in (out / "checkpoint-4").iterdir())
    # accelerate's save_state: each process saves its RNG state; everything else comes from rank 0 once.
    assert files == [
        "custom_checkpoint_0.pkl",  # the EMA weights
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "run_record.json",  # what the run was, read by name on resume
        "scheduler.bin",
    ]
    # The LR counts optimizer steps with 2 processes and accumulation 2 (accelerate would step it twice per step).
    lrs = scalars(out, "lr")
    assert lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3) and lrs[4] == 0.0
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()), abs=1e-9)


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    steps = ["--max_train_steps", "80", "--checkpointing_steps", "10", "--gradient_accumulation_steps", "2",
             "--random_flip", "--save_images_steps", "1000"]  # fmt: skip
    reference = tmp_path / "reference"
    launch(launch_flags(reference, *steps))

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        launch_command(launch_flags(resumed, *steps)),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (resumed / "checkpoint-10").is_dir():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its training process: a node that dies
        process.wait(timeout=30)
    assert not (resumed / "model_index.json").exists(), "killed too late: the run had finished"
    (resumed / "checkpoint-999999.tmp").mkdir()  # what a kill during a save leaves: never picked as `latest`

    log = launch(launch_flags(resumed, *steps, "--resume_from_checkpoint", "latest"))
    step = int(re.search(r"resumed from .*checkpoint-(\d+) at optimizer step (\d+)", log).group(2))
    assert 10 <= step < 80
    assert not (resumed / "checkpoint-999999.tmp").exists()

    for name in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-80/model.safetensors"):  # EMA and raw
        a, b = weights(reference / name), weights(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming from step {step}"
