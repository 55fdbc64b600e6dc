"""Training speed: images/s of hf_ddpm's training loop vs a loop written the way diffusers' example writes it.

Ours is `hf_ddpm.training.train` itself (what `accelerate launch training/train.py` runs), with its defaults; the
time is the loop's own (`train_seconds`: setup, the final evaluation and saving are not counted). Theirs follows
diffusers' examples/unconditional_image_generation/train_unconditional.py step for step: a `datasets` dataset with
per-image transforms (torchvision's Resize, CenterCrop, ToTensor, Normalize, reimplemented without torchvision)
in a shuffled DataLoader; per step torch.randn noise, DDPMScheduler.add_noise, F.mse_loss, accelerator.backward,
clip_grad_norm_, optimizer.step, lr_scheduler.step, zero_grad, EMAModel.step with its defaults and a logged
`loss.item()`. Same UNet, batch, precision, optimizer settings and data; both loops run in turn, several times.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from hf_ddpm.data import digits_dataset
from hf_ddpm.training import loop, parse_args
from hf_ddpm.training.model import build_scheduler
from hf_ddpm.training.resolve import RunFacts, resolve

from .measure import interleaved, log, paired_ratio, summary, timed
from .models import reset_accelerate, train_run, untrained_unet
from .report import TRAINING_FLOOR as FLOOR

PROFILES = {
    "smoke": {"model": "test-tiny", "resolution": 8, "T": 50, "batch": 4, "steps": 3, "rounds": 1, "options": ()},
    "quick": {"model": "digits-16-tiny", "resolution": 16, "T": 1000, "batch": 64, "steps": 20, "rounds": 2,
              "options": ("channels_last", "bf16")},
    "full": {"model": "digits-16-tiny", "resolution": 16, "T": 1000, "batch": 64, "steps": 60, "rounds": 5,
             "options": ("channels_last", "bf16", "compile")},
}  # fmt: skip
WARMUP_STEPS = 3  # one short run of each loop first: imports, allocator and oneDNN caches are then warm


class LoopClock(tqdm):
    """hf_ddpm's loop opens its progress bar just before its first step and closes it after its last one: the CPU
    time of the process in between is the loop's (its wall time is the run summary's `train_seconds`)."""

    cpu_seconds: float | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cpu_started = time.process_time()

    def close(self):
        if getattr(self, "_cpu_started", None) is not None:
            LoopClock.cpu_seconds, self._cpu_started = time.process_time() - self._cpu_started, None
        super().close()


def ours(settings: dict, steps: int, workdir: str, *options: str) -> tuple[float, float]:
    """(wall, CPU) seconds per image over `steps` optimizer steps of hf_ddpm's own loop: its defaults + `options`."""
    # no held-out split (the data is the same 1797 digits as theirs), and a one-image, one-step grid at the end
    flags = ["--lr_warmup_steps", str(min(100, steps)), "--eval_size", "0", "--eval_batch_size", "1",
             "--ddpm_num_inference_steps", "1", "--mixed_precision", "bf16" if "bf16" in options else "no"]  # fmt: skip
    LoopClock.cpu_seconds = None
    with mock.patch.object(loop, "tqdm", LoopClock):
        wall = train_run(settings, steps, os.path.join(workdir, "ours"), *flags, *(f"--{o}" for o in options if o != "bf16"))["train_seconds"]  # fmt: skip
    images = steps * settings["batch"]
    return wall / images, LoopClock.cpu_seconds / images


def _to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize(resolution, bilinear) + CenterCrop + ToTensor + Normalize([0.5], [0.5]), without torchvision."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div(255)  # ToTensor: (H, W) in [0, 1]
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return (x - 0.5) / 0.5


def theirs(settings: dict, steps: int, workdir: str, mixed_precision: str = "no") -> tuple[float, float]:
    """(wall, CPU) seconds per image over `steps` steps of a loop written as diffusers' train_unconditional.py writes it
    (its DataLoader keeps the last, partial batch of an epoch: the images actually seen are counted)."""
    reset_accelerate()
    resolution, batch = settings["resolution"], settings["batch"]
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(workdir, os.path.join(workdir, "theirs-logs")),
    )
    set_seed(0)
    model = untrained_unet(settings["model"], in_channels=1, out_channels=1, sample_size=resolution)
    args = resolve(parse_args([]), RunFacts())[0]  # the same optimizer settings as ours
    ema_model = EMAModel(
        model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
        power=args.ema_power, model_cls=UNet2DModel, model_config=model.config,
    )  # fmt: skip
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # DDPMScheduler(num_train_timesteps=T, beta_schedule="linear") with our β endpoints (the paper's scaled by
    # 1000/T, which at T = 1000 are diffusers' defaults)
    noise_scheduler = DDPMScheduler.from_config(
        build_scheduler(resolve(parse_args(["--ddpm_num_steps", str(settings["T"])]), RunFacts())[0]).config
    )
    optimizer = _adamw(model, args)  # the example's default per-tensor AdamW
    dataset = digits_dataset(resolution)

    def transform_images(examples):
        return {"input": [_to_tensor(image, resolution) for image in examples["image"]]}

    dataset.set_transform(transform_images)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    lr_scheduler = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=min(100, steps), num_training_steps=steps
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    ema_model.to(accelerator.device)
    accelerator.init_trackers("train_unconditional")

    global_step, seen = 0, 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(math.ceil(steps / len(train_dataloader))):
        model.train()
        progress_bar = tqdm(total=len(train_dataloader), disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")
        for batch_ in train_dataloader:
            if global_step == steps:
                break
            clean_images = batch_["input"].to(weight_dtype)
            noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
            bsz = clean_images.shape[0]
            seen += bsz
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device
            ).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema_model.step(model.parameters())
                progress_bar.update(1)
                global_step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
        progress_bar.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    accelerator.end_training()
    reset_accelerate()
    return seconds / seen, cpu_seconds / seen


def _adamw(model: UNet2DModel, args, **kwargs) -> torch.optim.AdamW:
    """AdamW with our training defaults (`args` from hf_ddpm's parse_args)."""
    return torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **kwargs,
    )  # fmt: skip


def floor(settings: dict, steps: int, channels: int = 1, warmup: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds per image of the model's own work in a step, nothing else: forward, L_simple, backward
    and a fused AdamW step on one fixed batch (no data pipeline, EMA, clipping, logging or host syncs), after
    `warmup` untimed steps. Neither loop can beat it with the same arithmetic: it bounds the ratio any loop can reach
    over the diffusers-style one (and it is what a training step consumes: the data benchmark's yardstick)."""
    set_seed(0)
    resolution, batch = settings["resolution"], settings["batch"]
    model = untrained_unet(settings["model"], in_channels=channels, out_channels=channels, sample_size=resolution)
    optimizer = _adamw(model, resolve(parse_args([]), RunFacts())[0], fused=True)  # as ours builds it
    x = torch.randn(batch, channels, resolution, resolution)
    t = torch.randint(0, settings["T"], (batch,))

    def step():
        F.mse_loss(model(x, t).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    wall, cpu = timed(lambda: [step() for _ in range(steps)])
    return wall / (steps * batch), cpu / (steps * batch)


def run(profile: str = "full") -> dict:
    settings = PROFILES[profile]
    steps, batch = settings["steps"], settings["batch"]
    with tempfile.TemporaryDirectory() as workdir:
        candidates = {
            "hf_ddpm (defaults, fp32)": lambda n: ours(settings, n, workdir),
            "diffusers example (fp32)": lambda n: theirs(settings, n, workdir),
            FLOOR: lambda n: floor(settings, n),
        }
        for option in settings["options"]:
            if option == "bf16":
                candidates["hf_ddpm --mixed_precision bf16"] = lambda n: ours(settings, n, workdir, "bf16")
                candidates["diffusers example (bf16)"] = lambda n: theirs(settings, n, workdir, "bf16")
            elif option == "channels_last":
                candidates["hf_ddpm --channels_last"] = lambda n: ours(settings, n, workdir, "channels_last")
        log(f"training: warming up {len(candidates)} loops ({WARMUP_STEPS} steps each)")
        for fn in candidates.values():
            fn(WARMUP_STEPS)
        log(f"training: {len(candidates)} loops x {settings['rounds']} rounds of {steps} steps at batch {batch}")
        times = interleaved(
            {name: (lambda fn=fn: fn(steps)) for name, fn in candidates.items()},
            rounds=settings["rounds"],
            warmup=0,
            measure=lambda fn: fn(),  # each loop reports its own seconds per image (setup and saving excluded)
        )
        compiled = None
        if "compile" in settings["options"]:
            log("training: hf_ddpm --compile: a first run compiles the UNet (forward and backward)")
            first = ours(settings, WARMUP_STEPS, workdir, "compile")[0] * WARMUP_STEPS * batch
            # then, compiled code cached, a short and a long run: their difference is the steady state
            short = ours(settings, WARMUP_STEPS, workdir, "compile")[0] * WARMUP_STEPS * batch
            long_ = ours(settings, WARMUP_STEPS + steps, workdir, "compile")[0] * (WARMUP_STEPS + steps) * batch
            compiled = {
                "first_steps": WARMUP_STEPS,
                "first_steps_seconds": first,
                "images_per_second_after_compile": steps * batch / max(long_ - short, 1e-9),
            }
    result = {"profile": profile, "model": settings["model"], "batch": batch, "steps_per_run": steps}
    baseline = "diffusers example (fp32)"
    for clock, t in times.items():  # t: seconds per image
        result[clock] = {
            "images_per_second": {name: summary([1.0 / s for s in v]) for name, v in t.items()},
            "speedup_vs_diffusers_fp32": {name: paired_ratio(t[baseline], v) for name, v in t.items()},
            "speedup_vs_same_precision": _same_precision(t),
            "raw_seconds_per_image": t,
        }
    result["compile"] = compiled
    return result


def _same_precision(times: dict) -> dict:
    """Ours over theirs at each precision both ran in (paired ratios of images/s)."""
    pairs = {"fp32": ("hf_ddpm (defaults, fp32)", "diffusers example (fp32)")}
    if "diffusers example (bf16)" in times:
        pairs["bf16"] = ("hf_ddpm --mixed_precision bf16", "diffusers example (bf16)")
    return {k: paired_ratio(times[b], times[a]) for k, (a, b) in pairs.items()}
