"""Sampling speed: HFDDPMPipeline vs diffusers' DDPMPipeline vs the bare UNet forward passes (the floor).

All three share one UNet (the same weights) and run the same batch and number of steps, interleaved in one process.
The floor is a loop of `unet(x_t, t)` over the inputs our pipeline gives its UNet: the network's cost alone, so
ours / floor - 1 is what the scheduler and the pipeline add. The same loops with a stub UNet (instant, fixed output)
measure that addition on its own as well. Then our speed options (bf16, channels_last, torch.compile) and
respacing (the time of one batch at fewer steps).
"""

from __future__ import annotations

import copy
import statistics

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler

from .measure import interleaved, log, paired_ratio, summary, timed
from .models import untrained_unet

PROFILES = {
    # a few seconds: for tests/test_benchmarks.py
    "smoke": {"model": "test-tiny", "num_train_timesteps": 20, "comparisons": [{"batch": 2, "steps": 20}], "rounds": 2,
              "options": {"batch": 2, "steps": 10, "rounds": 2, "compile": False},
              "respacing": {"batch": 2, "steps": [20, 10, 5], "rounds": 1}, "large_model": None},
    "quick": {"model": "digits-16-tiny", "num_train_timesteps": 1000, "rounds": 3,
              "comparisons": [{"batch": 1, "steps": 250}, {"batch": 16, "steps": 50}],
              "options": {"batch": 16, "steps": 20, "rounds": 3, "compile": False},
              "respacing": {"batch": 16, "steps": [250, 100, 50], "rounds": 1}, "large_model": None},
    "full": {"model": "digits-16-tiny", "num_train_timesteps": 1000, "rounds": 5,
             # the scheduler's cost per step does not depend on the number of steps: batch 16 at 200 steps gives the
             # per-step overhead at a larger batch in a fifth of the time of 1000 steps
             "comparisons": [{"batch": 1, "steps": 1000}, {"batch": 16, "steps": 200}],
             "options": {"batch": 16, "steps": 100, "rounds": 5, "compile": True},
             "respacing": {"batch": 16, "steps": [1000, 250, 100, 50], "rounds": 3},
             # the paper's CIFAR-10 UNet (35.7M parameters) is slow on a CPU: a small batch, 20 steps of the
             # 1000-step chain give its per-step cost
             "large_model": {"model": "ddpm-cifar10-32", "batch": 2, "steps": 20, "rounds": 3}},
}  # fmt: skip


def pipelines(unet: UNet2DModel, num_train_timesteps: int) -> tuple[HFDDPMPipeline, DDPMPipeline]:
    """Ours and diffusers', on the same UNet object and the same scheduler configuration."""
    scheduler = HFDDPMScheduler(num_train_timesteps=num_train_timesteps)
    ours = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    theirs = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)  # both: tqdm's terminal writes are not what is measured
    return ours, theirs


def sampler(pipe, batch: int, steps: int, seed: int = 0):
    """A call that draws `batch` images with `steps` steps from a fixed seed (a generator on the pipeline's device)."""
    return lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=seeded(pipe, seed), output_type="pt")


def seeded(pipe, seed: int) -> torch.Generator:
    return torch.Generator(device=pipe.device).manual_seed(seed)


def recorded_inputs(pipe, batch: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) that one sampling call from `seed` feeds its UNet, step by step."""
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append((args[0].clone(), args[1])))
    try:
        sampler(pipe, batch, steps, seed)()
    finally:
        hook.remove()
    return inputs


def unet_floor(unet: UNet2DModel, inputs: list[tuple[torch.Tensor, torch.Tensor]]):
    """The bare forward passes: `unet(x_t, t)` on the inputs a sampling call gave its UNet (`recorded_inputs`),
    the output kept until the next call as a sampling loop keeps it. Under torch.inference_mode, the cheapest way
    to run a forward pass in eager PyTorch (no_grad still bumps version counters and tracks views)."""

    @torch.inference_mode()
    def run():
        output = None
        for x, t in inputs:
            output = unet(x, t).sample
        return output

    return run


def stub_unet(unet: UNet2DModel, batch: int) -> UNet2DModel:
    """A copy of `unet` whose forward returns a fixed output at once (the real UNet's, for one x): what remains of a
    sampling loop run with it is the loop's own cost, the scheduler's and the pipeline's."""
    stub = copy.deepcopy(unet)
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, channels, size, size, generator=torch.manual_seed(0)).to(unet.device, unet.dtype)
    with torch.no_grad():
        output = unet(x, torch.tensor(500, device=unet.device)).sample  # any t: only realistic values matter
    stub.forward = lambda sample, timestep, *args, **kwargs: UNet2DOutput(sample=output)
    return stub


def compare(unet: UNet2DModel, num_train_timesteps: int, batch: int, steps: int, rounds: int) -> dict:
    """Ours, diffusers' and the floor, interleaved: seconds per image per step, overheads and ratio, per clock.

    The same three loops also run with a stub UNet (`stub_unet`): their times are the overheads alone, measured
    directly, which a loaded machine blurs much less than the difference of two long runs.
    """
    ours, theirs = pipelines(unet, num_train_timesteps)
    stub = stub_unet(unet, batch)
    ours_stub, theirs_stub = pipelines(stub, num_train_timesteps)
    inputs = recorded_inputs(ours, batch, steps)  # the floor replays exactly the UNet calls of our pipeline
    times = interleaved(
        {
            "hf_ddpm": sampler(ours, batch, steps),
            "diffusers": sampler(theirs, batch, steps),
            "unet_floor": unet_floor(unet, inputs),
            "hf_ddpm (stub UNet)": sampler(ours_stub, batch, steps),
            "diffusers (stub UNet)": sampler(theirs_stub, batch, steps),
            "loop (stub UNet)": unet_floor(stub, inputs),
        },
        rounds=rounds,
    )
    a = ours(batch_size=batch, num_inference_steps=steps, generator=seeded(ours, 1), output_type="pt").images
    b = theirs(batch_size=batch, num_inference_steps=steps, generator=seeded(theirs, 1), output_type="pt").images
    result = {"batch": batch, "steps": steps, "max_abs_diff_vs_diffusers": (a - b).abs().max().item()}
    for clock, t in times.items():
        med = {name: statistics.median(v) for name, v in t.items()}
        ours_alone = med["hf_ddpm (stub UNet)"] - med["loop (stub UNet)"]
        theirs_alone = med["diffusers (stub UNet)"] - med["loop (stub UNet)"]
        result[clock] = {
            "seconds_per_image_step": {name: summary(v, batch * steps) for name, v in t.items()},
            "overhead_over_floor": paired_ratio(t["hf_ddpm"], t["unet_floor"]) - 1.0,
            "diffusers_overhead_over_floor": paired_ratio(t["diffusers"], t["unet_floor"]) - 1.0,
            "speedup_vs_diffusers": paired_ratio(t["diffusers"], t["hf_ddpm"]),
            # (pipeline with the stub - bare loop with the stub) / floor: the overhead measured on its own
            "overhead_over_floor_stub": ours_alone / med["unet_floor"],
            "diffusers_overhead_over_floor_stub": theirs_alone / med["unet_floor"],
            "speedup_vs_diffusers_stub": (med["unet_floor"] + theirs_alone) / (med["unet_floor"] + ours_alone),
            "raw_seconds": t,
        }
    return result


def speed_options(unet: UNet2DModel, num_train_timesteps: int, batch: int, steps: int, rounds: int, compile_: bool):
    """Our pipeline with each speed option against float32 eager, interleaved."""
    scheduler = HFDDPMScheduler(num_train_timesteps=num_train_timesteps)

    def pipe_with(module):
        pipe = HFDDPMPipeline(unet=module, scheduler=copy.deepcopy(scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fp32 = pipe_with(unet)
    variants = {
        "fp32": sampler(fp32, batch, steps),
        "bf16 autocast": torch.autocast(unet.device.type, dtype=torch.bfloat16)(sampler(fp32, batch, steps)),
        "bf16 weights (pipe.to(torch.bfloat16))": sampler(
            pipe_with(copy.deepcopy(unet).to(torch.bfloat16)), batch, steps
        ),
        "channels_last": sampler(pipe_with(copy.deepcopy(unet).to(memory_format=torch.channels_last)), batch, steps),
    }
    result = {"batch": batch, "steps": steps, "compile": None}
    if compile_:
        compiled = copy.deepcopy(unet)
        compiled.compile()
        call = sampler(pipe_with(compiled), batch, steps)
        try:
            warmup = timed(call)[0]  # the first call compiles
        except Exception as err:  # no C++ compiler, an unsupported backend, ...: it shows at the first call
            result["compile"] = {"error": f"{type(err).__name__}: {err}"}
        else:
            result["compile"] = {"first_call_seconds": warmup, "eager_call_seconds": timed(variants["fp32"])[0]}
            variants["torch.compile"] = call
    times = interleaved(variants, rounds=rounds)
    for clock, t in times.items():
        result[clock] = {
            "seconds_per_image_step": {name: summary(v, batch * steps) for name, v in t.items()},
            "speedup_vs_fp32": {name: paired_ratio(t["fp32"], v) for name, v in t.items()},
            "raw_seconds": t,
        }
    return result


def respacing(unet: UNet2DModel, num_train_timesteps: int, batch: int, steps: list[int], rounds: int) -> dict:
    """The time of one batch at each number of (respaced) steps."""
    ours, _ = pipelines(unet, num_train_timesteps)
    times = interleaved({str(s): sampler(ours, batch, s) for s in steps}, rounds=rounds, warmup=0)  # warm already
    result = {"batch": batch, "steps": steps}
    for clock, t in times.items():
        result[clock] = {
            "seconds_per_batch": {str(s): summary(t[str(s)]) for s in steps},
            "speedup_vs_max_steps": {str(s): paired_ratio(t[str(max(steps))], t[str(s)]) for s in steps},
            "raw_seconds": t,
        }
    return result


@torch.no_grad()
def run(profile: str = "full") -> dict:
    settings = PROFILES[profile]
    T = settings["num_train_timesteps"]
    unet = untrained_unet(settings["model"]).eval()
    result = {"profile": profile, "model": settings["model"], "num_train_timesteps": T, "comparisons": []}
    result["parameters"] = sum(p.numel() for p in unet.parameters())
    for case in settings["comparisons"]:
        log(f"sampling: {settings['model']} batch {case['batch']}, {case['steps']} steps: ours / diffusers / floor")
        result["comparisons"].append(compare(unet, T, case["batch"], case["steps"], settings["rounds"]))
    large = settings["large_model"]
    if large is not None:
        log(f"sampling: {large['model']} batch {large['batch']}, {large['steps']} steps")
        big = untrained_unet(large["model"]).eval()
        row = compare(big, T, large["batch"], large["steps"], large["rounds"])
        row["model"], row["parameters"] = large["model"], sum(p.numel() for p in big.parameters())
        result["large_model"] = row
        del big
    opts = settings["options"]
    log(f"sampling: speed options, batch {opts['batch']}, {opts['steps']} steps")
    result["speed_options"] = speed_options(unet, T, opts["batch"], opts["steps"], opts["rounds"], opts["compile"])
    resp = settings["respacing"]
    log(f"sampling: respacing {resp['steps']}, batch {resp['batch']}")
    result["respacing"] = respacing(unet, T, resp["batch"], resp["steps"], resp["rounds"])
    return result
