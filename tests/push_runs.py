"""Pushes the Hub tests run: a training output directory to push (`make_output_dir`, with what must stay local),
`python -m hf_ddpm push` processes started at once against the test Hub, and what a cleanly failed push looks like."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import torch
from diffusers import UNet2DModel
from hub_clients import REPO, tree_hashes
from hub_server import HubServer

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.remote_code import remote_files

TOKEN = "hf_TestTokenNeverPushed0123456789"
REPO_ID = "test-user/tiny-ddpm"
T, SEED, BATCH = 20, 7, 2
MODULES = remote_files()  # {"pipeline": "pipeline_hf_ddpm_<hash>.py", "scheduler": "scheduler/scheduling_..."}
PUSHED = {
    ".gitattributes",  # written by the Hub when it creates a repo
    "README.md",
    "model_index.json",
    MODULES["pipeline"],
    "samples.png",
    "scheduler/scheduler_config.json",
    MODULES["scheduler"],
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}


def make_output_dir(path: Path) -> HFDDPMPipeline:
    """What training/train.py leaves in --output_dir, with a tiny untrained pipeline, plus what must stay local."""
    torch.manual_seed(0)
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")).eval(), HFDDPMScheduler(num_train_timesteps=T))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path, safe_serialization=True)
    PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(path / "samples.png")
    args = {"seed": 0, "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "use_ema": True}
    args |= {"output_dir": str(path), "eval_batch_size": 4, "ddpm_num_inference_steps": T, "push_to_hub": True}
    (path / "training_args.json").write_text(json.dumps(args))
    summary = {"optimizer_steps": 6, "world_size": 1, "train_seconds": 4.2, "images_per_optimizer_step": 4}
    summary["eval"] = {"bits_per_dim": 7.25, "bits_per_dim_stderr": 0.31, "num_images": 4, "num_timesteps": 2}
    (path / "training_summary.json").write_text(json.dumps(summary))
    for name, content in {
        "checkpoint-6/optimizer.bin": b"optimizer state",
        "checkpoint-6/random_states_0.pkl": b"rng",
        "logs/train/events.out.tfevents.1": f"a log that saw the token {TOKEN}".encode(),
        "samples/step-0000003.png": b"an earlier grid",
        "unet/diffusion_pytorch_model.bin": b"a stray pickled copy of the weights",
        "hub_token.txt": TOKEN.encode(),
    }.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return pipe


def start_cli(hub: HubServer, cwd: Path, argv: list[str], env_extra=None) -> subprocess.Popen:
    env = hub.env(cwd, TOKEN) | {"PYTHONPATH": str(REPO)} | (env_extra or {})
    process = subprocess.Popen([sys.executable, "-m", "hf_ddpm", *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    process.started = time.monotonic()
    return process


def wait(run: dict) -> dict:
    if "returncode" not in run:
        run["stdout"], run["stderr"] = run["process"].communicate(timeout=300)
        run["returncode"], run["seconds"] = run["process"].returncode, time.monotonic() - run["process"].started
    return run


def start_pushes(hub: HubServer, tmp: Path, cases: dict) -> dict:
    """One CLI push per case {name: (repo_id, extra argv, extra env)}, all at once, each of its own output dir."""
    runs = {}
    for name, (repo_id, extra, env_extra) in cases.items():
        out = tmp / name / "out"
        make_output_dir(out)
        runs[name] = {"out": out, "before": tree_hashes(out), "repo_id": repo_id}
        runs[name]["process"] = start_cli(hub, tmp / name, ["push", str(out), "--repo-id", repo_id, *extra], env_extra)
    return runs


def assert_failed_cleanly(run: dict, reason: str, retry_flags: str = "") -> None:
    """Exit 1 with the reason, the output untouched, the command that pushes again; never the token."""
    assert run["returncode"] == 1 and reason in run["stderr"], run["stderr"]
    assert f"Nothing in {run['out']} was changed. To push it again, run:\n" in run["stderr"]
    assert f"    python -m hf_ddpm push {run['out']} --repo_id {run['repo_id']}{retry_flags}\n" in run["stderr"]
    assert TOKEN not in run["stdout"] + run["stderr"]
    assert tree_hashes(run["out"]) == run["before"]
