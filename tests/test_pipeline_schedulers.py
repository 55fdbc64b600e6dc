"""HFDDPMPipeline with every scheduler of `HFDDPMScheduler.compatibles`: the same images as diffusers' own sampling
loop for that scheduler, for an ε model and a learned-range model; the bound whatever scheduler the pipeline holds."""

import inspect

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.scheduler_configs import ddpm_scheduler_from_config

T = 40
STEPS = 8
FOREIGN = [
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pipe(learned: bool, **scheduler_kwargs) -> HFDDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", learned_variance=learned)).eval()
    variance = "learned_range" if learned else "fixed_large"
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type=variance, **scheduler_kwargs)
    pipe = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def swapped(pipe, name: str, **kwargs):
    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **kwargs)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == pipe.scheduler.config[key], (name, key)  # not the new class's defaults
    if name == "DPMSolverMultistepScheduler":
        assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2  # ++ 2M
    return scheduler


@torch.no_grad()
def reference_loop(unet, scheduler, steps: int, seed: int, batch: int = 2) -> torch.Tensor:
    """The loop diffusers' pipelines run, written out: scaled initial noise, scale_model_input, step; a learned-range
    model's variance channels go only to the DDPM schedulers (the only steps that read them: diffusers' DDIM, Euler,
    ... would fail on them with a shape error or treat them as part of ε)."""
    generator = torch.manual_seed(seed)
    channels, size = unet.config.in_channels, unet.config.sample_size
    scheduler.set_timesteps(steps)
    x = randn_tensor((batch, channels, size, size), generator=generator) * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(x, t), t).sample
        reads_variance = isinstance(scheduler, (DDPMScheduler, HFDDPMScheduler))
        if not (reads_variance and scheduler.config.get("variance_type") == "learned_range"):
            output = output[:, :channels]
        x = scheduler.step(output, t, x, **extra).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def test_compatibles_are_the_tested_schedulers():
    names = {c.__name__ for c in HFDDPMScheduler(num_train_timesteps=T).compatibles}
    assert names == set(FOREIGN)  # diffusers resolves the names in its own namespace: ours is not listed


@pytest.mark.parametrize("learned", [False, True], ids=["epsilon", "learned_range"])
@pytest.mark.parametrize("name", ["HFDDPMScheduler", *FOREIGN])
def test_same_images_as_diffusers_reference_loop(name, learned):
    pipe = make_pipe(learned)
    if name != "HFDDPMScheduler":
        pipe.scheduler = swapped(pipe, name)
    ours = pipe(batch_size=2, generator=torch.manual_seed(5), num_inference_steps=STEPS, output_type="pt").images
    reference = reference_loop(pipe.unet, pipe.scheduler, STEPS, seed=5)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert torch.isfinite(ours).all() and ours.std() > 0.05


def test_the_foreign_loop_differs_from_a_loop_without_noise_scaling():
    """The check above would be empty if init_noise_sigma were 1: Euler's is not, and scale_model_input matters."""
    pipe = make_pipe(False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ours = pipe(batch_size=2, generator=torch.manual_seed(5), num_inference_steps=STEPS, output_type="pt").images
    assert abs(pipe.scheduler.init_noise_sigma - 1) > 0.2
    scheduler, x = pipe.scheduler, randn_tensor((2, 3, 8, 8), generator=torch.manual_seed(5))
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:  # what the old loop did: neither scaling
            x = scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    assert (ours - (x / 2 + 0.5).clamp(0, 1)).abs().max() > 0.1


def test_same_images_as_diffusers_ddpm_pipeline_for_a_learned_range_model():
    pipe = make_pipe(True)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    theirs = DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    theirs.set_progress_bar_config(disable=True)
    ours = pipe(batch_size=2, generator=torch.manual_seed(1), num_inference_steps=STEPS, output_type="np").images
    reference = theirs(batch_size=2, generator=torch.manual_seed(1), num_inference_steps=STEPS, output_type="np")
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(reference.images), rtol=0, atol=1e-5)


def test_callback_gets_pred_original_sample_only_where_the_scheduler_gives_it():
    pipe = make_pipe(False)
    seen = {}

    def callback(p, i, t, tensors):
        seen.setdefault(type(p.scheduler).__name__, set()).update(tensors)
        return {}

    for name in ("DDIMScheduler", "UniPCMultistepScheduler"):
        pipe.scheduler = swapped(pipe, name)
        pipe(batch_size=1, num_inference_steps=4, output_type="pt", callback_on_step_end=callback)
    assert seen == {"DDIMScheduler": {"sample", "pred_original_sample"}, "UniPCMultistepScheduler": {"sample"}}


@pytest.mark.parametrize("name", ["HFDDPMScheduler", "DPMSolverMultistepScheduler"])
def test_interrupt_from_a_callback_skips_the_remaining_steps(name):
    pipe = make_pipe(False)
    if name != "HFDDPMScheduler":
        pipe.scheduler = swapped(pipe, name)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))

    def stop_after_three(p, i, t, tensors):
        p._interrupt = i == 2 or p._interrupt
        return {}

    images = pipe(batch_size=2, num_inference_steps=STEPS, output_type="pt", callback_on_step_end=stop_after_three)
    assert len(calls) == 3 and images.images.shape == (2, 3, 8, 8)
    calls.clear()
    pipe(batch_size=2, num_inference_steps=STEPS, output_type="pt")  # the flag is reset at the next call
    assert len(calls) == STEPS


def test_generator_list_must_have_one_generator_per_image():
    pipe = make_pipe(False)
    with pytest.raises(ValueError, match="list of 3 generators but batch_size=2"):
        pipe(batch_size=2, generator=[torch.Generator().manual_seed(i) for i in range(3)], num_inference_steps=2)
    generators = [torch.Generator().manual_seed(i) for i in (7, 8)]
    per_image = pipe(batch_size=2, generator=generators, num_inference_steps=3, output_type="pt")
    single = pipe(batch_size=1, generator=[torch.Generator().manual_seed(8)], num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(per_image.images[1:], single.images)


def test_custom_timesteps_with_a_scheduler_that_takes_none_is_a_clear_error():
    pipe = make_pipe(False)
    pipe.scheduler = swapped(pipe, "PNDMScheduler")
    with pytest.raises(ValueError, match="PNDMScheduler.set_timesteps takes no custom timesteps"):
        pipe(batch_size=1, timesteps=[30, 10, 0])


# ------------------------------------------------------------------ the bound whatever the scheduler


@pytest.fixture(scope="module")
def digits():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 8, 8), generator=generator, dtype=torch.uint8)


def bound(pipe, images):
    return pipe.bits_per_dim(images, generator=torch.manual_seed(0)).bits_per_dim


@pytest.mark.parametrize("learned", [False, True], ids=["fixed_large", "learned_range"])
def test_bits_per_dim_is_unchanged_by_swapping_the_scheduler(learned, digits):
    pipe = make_pipe(learned, clip_sample=True)
    before = bound(pipe, digits)
    for name in FOREIGN:
        scheduler = swapped(pipe, name)
        # keys the foreign config lacks fall back to DDPM defaults; fixed_large is kept where the config has the key
        if "variance_type" not in scheduler.config or scheduler.config.variance_type is None:
            continue
        after = HFDDPMPipeline(unet=pipe.unet, scheduler=scheduler)
        torch.testing.assert_close(bound(after, digits), before, rtol=0, atol=1e-12, msg=name)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(bound(pipe, digits), before, rtol=0, atol=1e-12)
    via_components = HFDDPMPipeline(
        **DDPMPipeline(unet=pipe.unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config)).components
    )
    torch.testing.assert_close(bound(via_components, digits), before, rtol=0, atol=1e-12)
    via_from_pipe = HFDDPMPipeline.from_pipe(DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler))
    torch.testing.assert_close(bound(via_from_pipe, digits), before, rtol=0, atol=1e-12)


def test_a_pipeline_saved_with_a_swapped_scheduler_loads_with_it_in_both_loaders(tmp_path, digits):
    """DiffusionPipeline loads the class model_index.json names; HFDDPMPipeline.from_pretrained loads the same one,
    so both sample alike, and the bound (of the config's DDPM process) is the saved pipeline's. DDPMScheduler, the
    same process as ours, still loads as HFDDPMScheduler."""
    pipe = make_pipe(False, clip_sample=True)
    before = bound(pipe, digits)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "ddim")
    ours = HFDDPMPipeline.from_pretrained(tmp_path / "ddim")
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ddim", trust_remote_code=True)
    assert type(ours.scheduler) is type(theirs.scheduler) is DDIMScheduler
    keys = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731 (not diffusers' own)
    assert keys(ours.scheduler) == keys(theirs.scheduler) == keys(pipe.scheduler)
    for loaded in (ours, theirs):
        loaded.set_progress_bar_config(disable=True)
    samples = [p(batch_size=2, num_inference_steps=STEPS, generator=torch.manual_seed(1), output_type="pt").images
               for p in (pipe, ours, theirs)]  # fmt: skip
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)
    torch.testing.assert_close(samples[2], samples[0], rtol=0, atol=0)
    torch.testing.assert_close(bound(ours, digits), before, rtol=0, atol=1e-12)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "ddpm")
    assert type(HFDDPMPipeline.from_pretrained(tmp_path / "ddpm").scheduler) is HFDDPMScheduler


def test_bits_per_dim_with_a_scheduler_without_variance_type_uses_the_model_channels(digits):
    """Euler's config has no variance_type: a 2C-channel UNet means learned_range, a C-channel one fixed_small."""
    learned = make_pipe(True)
    before = bound(learned, digits)
    learned.scheduler = EulerDiscreteScheduler(num_train_timesteps=T)  # same β defaults, no variance_type key
    assert "variance_type" not in learned.scheduler.config
    torch.testing.assert_close(bound(learned, digits), before, rtol=0, atol=1e-12)
    fixed = make_pipe(False)
    fixed.scheduler = HFDDPMScheduler.from_config(fixed.scheduler.config, variance_type="fixed_small")
    small = bound(fixed, digits)
    fixed.scheduler = EulerDiscreteScheduler(num_train_timesteps=T)
    torch.testing.assert_close(bound(fixed, digits), small, rtol=0, atol=1e-12)


def test_bits_per_dim_refuses_a_scheduler_that_defines_no_ddpm_process(digits):
    pipe = make_pipe(False)
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="EDMEulerScheduler config defines none .* no beta_schedule"):
        pipe.bits_per_dim(digits)
    with pytest.raises(ValueError, match="defines no DDPM process that can be evaluated: rescale_betas_zero_snr"):
        ddpm_scheduler_from_config(
            HFDDPMScheduler, DDIMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True).config
        )


def test_bits_per_dim_refuses_an_empty_batch():
    pipe = make_pipe(False)
    with pytest.raises(ValueError, match=r"images holds no image: shape \(0, 3, 8, 8\)"):
        pipe.bits_per_dim(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------ a trained model: statistics, not collapsed

USUAL_STEPS = {  # each scheduler at the step count its users take
    "DDIMScheduler": 50,
    "DPMSolverMultistepScheduler": 20,
    "EulerDiscreteScheduler": 50,
    "EulerAncestralDiscreteScheduler": 50,
    "HeunDiscreteScheduler": 25,
    "PNDMScheduler": 50,
    "UniPCMultistepScheduler": 20,
    "LMSDiscreteScheduler": 50,
    "DDPMScheduler": 250,
}


@pytest.fixture(scope="module")
def trained_digits_pipe():
    """The test-tiny UNet (one channel) trained for 400 steps on sklearn's 8x8 digits with L_simple (DDPM eq. 14),
    T = 1000, linear β: a written-out loop, so that the test depends on nothing but the scheduler's add_noise."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1], (1797, 1, 8, 8)
    unet = UNet2DModel(**unet_config("test-tiny", in_channels=1, out_channels=1))
    scheduler = HFDDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        x0 = data[torch.randint(0, len(data), (64,), generator=generator)]
        t = torch.randint(0, 1000, (64,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t).float(), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe = HFDDPMPipeline(unet.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def statistics(images: torch.Tensor) -> tuple[float, float, float]:
    """(mean pixel value, std over all pixels, mean over pixels of the std across the batch) of images in [0, 1]."""
    return images.mean().item(), images.std().item(), images.std(dim=0).mean().item()


@pytest.mark.slow
def test_every_scheduler_samples_the_trained_model_like_1000_step_ancestral_sampling(trained_digits_pipe):
    pipe = trained_digits_pipe
    ddpm_config = pipe.scheduler.config
    reference = pipe(batch_size=256, generator=torch.manual_seed(0), num_inference_steps=1000, output_type="pt")
    mean, std, spread = statistics(reference.images)
    assert 0.1 < mean < 0.6 and spread > 0.2  # digits: dark background, varied strokes
    for name, steps in USUAL_STEPS.items():
        pipe.scheduler = getattr(diffusers, name).from_config(ddpm_config)
        images = pipe(batch_size=256, generator=torch.manual_seed(1), num_inference_steps=steps, output_type="pt")
        m, s, sp = statistics(images.images)
        assert abs(m - mean) < 0.05 and abs(s - std) < 0.05, (name, m, s, mean, std)
        assert sp > 0.75 * spread, (name, sp, spread)  # not collapsed onto a few images
