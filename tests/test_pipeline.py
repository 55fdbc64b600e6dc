"""HFDDPMPipeline sampling: determinism, agreement with diffusers' DDPMPipeline, outputs, respacing, save/load."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.images import model_to_pixels, model_to_unit, pixels_to_model, unit_to_pixels

T = 50


def make_pipe(variance_type="fixed_small", learned=False, **scheduler_kwargs):
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", learned_variance=learned)).eval()
    scheduler = HFDDPMScheduler(num_train_timesteps=T, variance_type=variance_type, **scheduler_kwargs)
    pipe = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, steps=T, **kwargs):
    return pipe(batch_size=2, generator=torch.manual_seed(seed), num_inference_steps=steps, output_type="pt", **kwargs)


def test_sampling_is_deterministic_with_a_generator():
    pipe = make_pipe()
    a, b, c = sample(pipe, 0).images, sample(pipe, 0).images, sample(pipe, 1).images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("steps", [T, 10])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_same_images_as_diffusers_ddpm_pipeline(steps, variance_type, spacing):
    """Same UNet, same scheduler settings, same generator: the same images (up to float32 rounding)."""
    pipe = make_pipe(variance_type, timestep_spacing=spacing)
    theirs = DDPMPipeline(unet=pipe.unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    theirs.set_progress_bar_config(disable=True)
    ours = sample(pipe, 3, steps).images
    reference = theirs(batch_size=2, generator=torch.manual_seed(3), num_inference_steps=steps, output_type="np")
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), reference.images, atol=1e-4)
    assert ours.std() > 0.05  # real images, not a constant


def test_output_types_and_return_dict():
    pipe = make_pipe()
    pil = pipe(batch_size=3, generator=torch.manual_seed(0), num_inference_steps=5).images
    assert len(pil) == 3 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil)
    array = pipe(batch_size=3, generator=torch.manual_seed(0), num_inference_steps=5, output_type="np").images
    assert array.shape == (3, 8, 8, 3) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0
    tensor = pipe(batch_size=3, generator=torch.manual_seed(0), num_inference_steps=5, output_type="pt").images
    assert tensor.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    np.testing.assert_array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    (as_tuple,) = pipe(batch_size=1, num_inference_steps=5, output_type="np", return_dict=False)
    assert as_tuple.shape == (1, 8, 8, 3)


def test_respaced_sampling_visits_the_chosen_timesteps():
    pipe = make_pipe()
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    sample(pipe, steps=7)
    hook.remove()
    assert seen == pipe.scheduler.timesteps.tolist() and len(seen) == 7
    assert seen == sorted(seen, reverse=True) and seen[-1] == 0
    seen.clear()
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    pipe(batch_size=1, timesteps=[40, 25, 3], output_type="pt")
    hook.remove()
    assert seen == [40, 25, 3]


def test_callback_sees_every_step_and_can_replace_the_sample():
    pipe = make_pipe()
    calls = []

    def callback(p, i, t, tensors):
        calls.append((i, t, tensors["sample"].shape, tensors["pred_original_sample"].shape))
        return {"sample": torch.zeros_like(tensors["sample"])} if i == 4 else {}

    images = sample(pipe, steps=5, callback_on_step_end=callback).images
    assert [c[0] for c in calls] == list(range(5))
    assert [c[1] for c in calls] == pipe.scheduler.timesteps.tolist()
    assert all(c[2] == (2, 3, 8, 8) and c[3] == (2, 3, 8, 8) for c in calls)
    torch.testing.assert_close(images, torch.full_like(images, 0.5))  # the replaced last sample, mapped to [0, 1]
    with pytest.raises(ValueError, match="callback tensor inputs"):
        sample(pipe, steps=5, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])


def test_learned_range_pipeline_samples():
    pipe = make_pipe("learned_range", learned=True)
    images = sample(pipe, steps=10).images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="2 × 3 output channels"):
        sample(make_pipe("learned_range", learned=False), steps=10)


def test_bf16_unet_runs_under_a_float32_chain():
    pipe = make_pipe()
    reference = sample(pipe, steps=10).images
    pipe.to(torch.bfloat16)
    dtypes = []
    hook = pipe.unet.conv_in.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    images = sample(pipe, steps=10).images
    hook.remove()
    assert set(dtypes) == {torch.bfloat16} and images.dtype == torch.float32
    assert (images - reference).abs().mean() < 0.05  # same noise, slightly different network arithmetic


def test_the_sampling_loop_reads_the_unet_dtype_once_per_call(monkeypatch):
    """diffusers' `unet.dtype` walks every submodule (about as long as a scheduler step for a small UNet): the loop
    reads it once, before its first step; per step only the UNet's own forward reads it."""
    pipe = make_pipe()
    reads = []
    dtype = UNet2DModel.dtype
    monkeypatch.setattr(UNet2DModel, "dtype", property(lambda self: reads.append(1) or dtype.fget(self)))
    with torch.no_grad():
        pipe.unet(torch.zeros(2, 3, 8, 8), torch.tensor(5))
    per_forward = len(reads)
    reads.clear()
    sample(pipe, steps=10)
    assert len(reads) - 10 * per_forward <= 2  # was 10 more: one read per step


def test_the_unet_runs_in_inference_mode_and_the_caller_gets_an_ordinary_tensor():
    """Sampling runs under torch.inference_mode (no autograd bookkeeping per op); the "pt" images it returns are an
    ordinary tensor all the same: in-place ops and autograd work on them as on any tensor."""
    pipe = make_pipe()
    modes = []
    pipe.unet.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    images = sample(pipe, steps=5).images
    assert modes == [True] * 5
    assert not images.is_inference()
    expected = images.clone()
    images.mul_(2).requires_grad_()  # an inference tensor raises on both outside inference mode
    torch.testing.assert_close(images.detach(), 2 * expected)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_inference_steps": 0}, r"num_inference_steps=0 is out of range: it must lie in \[1, 50\]"),
    ({"num_inference_steps": T + 1}, "num_inference_steps=51"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"output_type": "latent"}, "output_type='latent' is not supported"),
    ({"timesteps": [3, 10]}, "strictly decreasing"),
])  # fmt: skip
def test_bad_arguments_raise(kwargs, match):
    pipe = make_pipe()
    with pytest.raises(ValueError, match=match):
        pipe(**{"num_inference_steps": 5, **kwargs})


def test_save_and_load_round_trip(tmp_path):
    pipe = make_pipe("fixed_large", timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"][1] == "HFDDPMPipeline" and index["_class_name"][0].startswith("pipeline_hf_ddpm_")
    assert index["scheduler"][1] == "HFDDPMScheduler"
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin"))
    loaded = HFDDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, HFDDPMPipeline) and isinstance(loaded.scheduler, HFDDPMScheduler)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.variance_type == "fixed_large"
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    assert torch.equal(sample(loaded, 4, steps=6).images, sample(pipe, 4, steps=6).images)


def test_pixel_conversions_are_inverse_on_every_pixel_value_and_clamp_outside():
    """images.py, the one home of uint8 <-> model range: pixel k is k / 127.5 - 1 (the centre of its eq. 13 bin),
    any x within half a bin maps back to k, and values past [-1, 1] clamp to 0 and 255."""
    k = torch.arange(256, dtype=torch.uint8)
    x = pixels_to_model(k)
    assert x.dtype == torch.float32 and x[0].item() == -1.0 and x[255].item() == 1.0
    assert x[128].item() == pytest.approx(128 / 127.5 - 1, abs=1e-7)
    assert torch.equal(model_to_pixels(x), k)
    assert torch.equal(model_to_pixels(x + 0.49 / 127.5), k) and torch.equal(model_to_pixels(x - 0.49 / 127.5), k)
    assert model_to_pixels(torch.tensor([-3.0, -1.0, 1.0, 3.0])).tolist() == [0, 0, 255, 255]
    torch.testing.assert_close(model_to_unit(x), k.float() / 255, rtol=0, atol=1e-7)
    assert torch.equal(unit_to_pixels(model_to_unit(x)), k) and unit_to_pixels(torch.tensor([-0.5, 1.5])).tolist() == [
        0,
        255,
    ]
    assert HFDDPMPipeline.model_to_pixels is model_to_pixels  # what the Space previews with
