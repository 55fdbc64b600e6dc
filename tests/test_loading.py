"""Existing DDPM checkpoints load into HFDDPMPipeline, sample and evaluate: local replicas of the google/ddpm-*
repos' layouts (configs written as those repos have them, with tiny sizes), in every layout and config version."""

import io
import json
import logging
import shutil
import sys
import warnings

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.utils import logging as diffusers_logging
from hub_clients import REPO, finish, start_script

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler

T = 1000  # the google/ddpm-* repos' T

# google/ddpm-cifar10-32/unet/config.json, key for key, with a tiny network (the repo: [128, 256, 256, 256], 32 px).
UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [32, 32],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 8,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
# scheduler/scheduler_config.json of the same repo (current keys) ...
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
# ... and its top-level scheduler_config.json, the early keys of diffusers' first release.
EARLY_SCHEDULER_CONFIG = {
    "_class_name": "GaussianDDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "timesteps": 1000,
    "variance_type": "fixed_large",
}
# its top-level config.json: the first release's UNetModel, which no diffusers loader reads any more
EARLY_UNET_CONFIG = {"_class_name": "UNetModel", "ch": 128, "ch_mult": [1, 2, 2, 2], "resolution": 32}
MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel.from_config({k: v for k, v in UNET_CONFIG.items() if not k.startswith("_")}).eval()


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def save_weights(unet, folder, formats=("safetensors", "bin")):
    """The weight files the repos hold: diffusion_pytorch_model.bin and (added later) .safetensors."""
    for kind in formats:
        unet.save_pretrained(folder / "_w", safe_serialization=kind == "safetensors")
        name = f"diffusion_pytorch_model.{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(folder / "_w" / name, folder / name)
        shutil.rmtree(folder / "_w")


def subfolder_layout(root, unet, formats=("safetensors", "bin")):
    """google/ddpm-cifar10-32 today: a DDPMPipeline in unet/ and scheduler/, with the first release's files left
    at the top level."""
    write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "unet" / "config.json", UNET_CONFIG)
    save_weights(unet, root / "unet", formats)
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(root / "scheduler_config.json", EARLY_SCHEDULER_CONFIG)
    write_json(root / "config.json", EARLY_UNET_CONFIG)
    return root


def flat_layout(root, unet, with_index=True, scheduler_config=EARLY_SCHEDULER_CONFIG):
    """A model saved alone: UNet config and weights and the scheduler config at the top level."""
    if with_index:
        write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "config.json", UNET_CONFIG)
    save_weights(unet, root)
    write_json(root / "scheduler_config.json", scheduler_config)
    return root


def reference(unet) -> HFDDPMPipeline:
    pipe = HFDDPMPipeline(unet, HFDDPMScheduler(num_train_timesteps=T, variance_type="fixed_large"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_loads_samples_and_evaluates(path, unet, **kwargs):
    pipe = HFDDPMPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    assert (config.num_train_timesteps, config.variance_type, config.beta_end) == (T, "fixed_large", 0.02)
    expected = reference(unet)
    for name, p in pipe.unet.state_dict().items():
        assert torch.equal(p, expected.unet.state_dict()[name]), name
    sample = dict(batch_size=2, num_inference_steps=5, output_type="pt")
    ours = pipe(generator=torch.manual_seed(0), **sample).images
    torch.testing.assert_close(ours, expected(generator=torch.manual_seed(0), **sample).images, rtol=0, atol=0)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    bound = pipe.bits_per_dim(images, num_timesteps=4, generator=torch.manual_seed(2)).bits_per_dim
    theirs = expected.bits_per_dim(images, num_timesteps=4, generator=torch.manual_seed(2)).bits_per_dim
    torch.testing.assert_close(bound, theirs, rtol=0, atol=0)
    assert torch.isfinite(bound).all() and (bound > 0).all()


def test_the_subfolder_layout_loads_samples_and_evaluates(tmp_path, unet):
    check_loads_samples_and_evaluates(subfolder_layout(tmp_path / "repo", unet), unet)


@pytest.mark.parametrize("with_index", [True, False], ids=["with_model_index", "without_model_index"])
def test_the_flat_layout_with_early_scheduler_keys_loads_samples_and_evaluates(tmp_path, unet, with_index):
    check_loads_samples_and_evaluates(flat_layout(tmp_path / "repo", unet, with_index), unet)


def test_early_keys_map_timesteps_to_num_train_timesteps(tmp_path):
    write_json(tmp_path / "scheduler_config.json", EARLY_SCHEDULER_CONFIG | {"timesteps": 400})
    scheduler = HFDDPMScheduler.from_pretrained(tmp_path)
    assert scheduler.config.num_train_timesteps == 400 and len(scheduler.betas) == 400
    assert scheduler.config.variance_type == "fixed_large" and "timesteps" not in scheduler.config
    current = HFDDPMScheduler.from_config(SCHEDULER_CONFIG | {"num_train_timesteps": 400})
    torch.testing.assert_close(scheduler.alphas_cumprod, current.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["subfolders", "flat"])
def test_pickled_weights_only_with_the_explicit_opt_in(tmp_path, unet, layout):
    if layout == "subfolders":
        root, folder = subfolder_layout(tmp_path / "repo", unet, formats=("bin",)), tmp_path / "repo" / "unet"
    else:
        root = folder = flat_layout(tmp_path / "repo", unet)
        (root / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match=f"{folder} holds only pickled weights .*use_safetensors=False"):
        HFDDPMPipeline.from_pretrained(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_loads_samples_and_evaluates(root, unet, use_safetensors=False)
    assert any("Unpickling can run code" in str(w.message) for w in caught)


def test_a_first_release_unet_config_is_refused_clearly(tmp_path):
    write_json(tmp_path / "config.json", EARLY_UNET_CONFIG)
    write_json(tmp_path / "scheduler_config.json", EARLY_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="config.json describes a UNetModel, not a UNet2DModel"):
        HFDDPMPipeline.from_pretrained(tmp_path)


def test_both_layouts_load_from_a_hub_repo(tmp_path, unet, hub):
    """The Hub path (no local directory to look into): each replica uploaded to the test Hub loads the same."""
    subfolder_layout(tmp_path / "subfolders", unet)
    flat_layout(tmp_path / "flat", unet, with_index=False)
    torch.save(unet.state_dict(), tmp_path / "state.pt")
    script = f"""
        import torch
        from huggingface_hub import create_repo, upload_folder
        from diffusers import UNet2DModel
        from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler
        for layout in ("subfolders", "flat"):
            repo = create_repo("test-user/ddpm-" + layout, token="hf_x").repo_id
            upload_folder(repo_id=repo, folder_path={str(tmp_path)!r} + "/" + layout, token="hf_x")
            pipe = HFDDPMPipeline.from_pretrained(repo)
            assert pipe.scheduler.config.num_train_timesteps == {T}, pipe.scheduler.config
            assert pipe.scheduler.config.variance_type == "fixed_large"
            state = torch.load({str(tmp_path / "state.pt")!r})
            assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
            print(layout, "ok")
    """
    env = hub.env(tmp_path, "hf_x") | {"PYTHONPATH": str(REPO)}
    assert finish(start_script(sys.executable, script, env, tmp_path)).split() == ["subfolders", "ok", "flat", "ok"]


def test_torch_dtype_loads_without_diffusers_cast_warning(tmp_path, unet):
    """The README's speed line: torch_dtype= at load time, not pipe.to(dtype) afterwards (which diffusers warns about)."""
    subfolder_layout(tmp_path / "repo", unet)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        pipe = HFDDPMPipeline.from_pretrained(tmp_path / "repo", torch_dtype=torch.bfloat16)
        assert pipe.unet.dtype == torch.bfloat16 and "Casting directly with `to()`" not in log.getvalue()
        HFDDPMPipeline.from_pretrained(tmp_path / "repo").to(torch.bfloat16)
        assert "Casting directly with `to()`" in log.getvalue()  # what the README no longer does
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)


def test_a_dtype_named_as_configs_write_it_loads_in_that_dtype(tmp_path, unet):
    """A dtype named "float16" (a config's spelling) loads float16; diffusers alone would load float32 and log that
    the string is not a torch.dtype. A name that is no dtype is refused, naming it."""
    subfolder_layout(tmp_path / "repo", unet, formats=("safetensors",))
    named = {"float16": torch.float16, "torch.bfloat16": torch.bfloat16}
    for given, dtype in (*named.items(), ({"unet": "float64"}, torch.float64)):
        assert HFDDPMPipeline.from_pretrained(tmp_path / "repo", torch_dtype=given).unet.dtype == dtype, given
    assert HFDDPMPipeline.from_pretrained(tmp_path / "repo", dtype="float16").unet.dtype == torch.float16
    with pytest.raises(ValueError, match=r"torch_dtype='half precision' is not a torch dtype: pass one, e\.g\. "):
        HFDDPMPipeline.from_pretrained(tmp_path / "repo", torch_dtype="half precision")
    with pytest.raises(ValueError, match=r"torch_dtype='Size' is not a torch dtype"):  # a torch name, not a dtype
        HFDDPMPipeline.from_pretrained(tmp_path / "repo", torch_dtype="Size")


def test_a_loaded_unet_computes_bit_for_bit_what_the_saved_one_computed(tmp_path):
    """safetensors hands the weights over as views into the file's memory map, at its byte offsets; on an AVX2 CPU a
    convolution over weights at such an offset rounded its last float32 bits differently from the same weights in
    memory of their own, so a loaded model did not compute what it computed when saved (and a 1-process evaluation
    not what a 2-process one did). Loaded by hf_ddpm, the weights are the model's own memory again."""
    from hf_ddpm import unet_config
    from hf_ddpm.loading import load_unet

    torch.manual_seed(0)
    saved = UNet2DModel(**unet_config("test-tiny", sample_size=16, in_channels=1, out_channels=1)).eval()
    HFDDPMPipeline(unet=saved, scheduler=HFDDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "p")
    x, t = torch.randn(1, 1, 16, 16, generator=torch.manual_seed(1)), torch.tensor([0.0005])
    with torch.no_grad():
        expected = saved(x, t).sample
        for loaded in (load_unet(tmp_path / "p"), HFDDPMPipeline.from_pretrained(tmp_path / "p").unet):
            assert torch.equal(loaded(x, t).sample, expected)
