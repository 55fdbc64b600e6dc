"""Bad input: each gives an error that names the value and what is allowed, before anything is written.

Training is run in this process; a refused run must leave --output_dir as it was (here: not created at all).
Cases already tested elsewhere are listed in the README's Reliability table; these are the rest.
"""

import json

import datasets
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from image_files import write_folder, write_parquet
from PIL import Image
from training_runs import tiny

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.training import parse_args, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def refused(tmp_path, argv, error, match):
    """Training with `argv` (on top of the tiny run) raises `error` matching `match`; --output_dir is not created."""
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        train(parse_args(tiny(out, *argv)))
    assert not out.exists()


def tiny_pipeline(path=None, variance_type="fixed_small", num_train_timesteps=20, **unet) -> HFDDPMPipeline:
    torch.manual_seed(0)
    scheduler = HFDDPMScheduler(num_train_timesteps=num_train_timesteps, variance_type=variance_type)
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny", **unet)), scheduler)
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


# ------------------------------------------------------------------------------------------------ data


def test_an_empty_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path, ["--train_data_dir", str(tmp_path / "empty")], ValueError, r"empty' holds no image files \(0 ")


def test_corrupt_images_are_skipped_with_their_count_or_stop_the_run(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, {f"{i}.png": Image.new("RGB", (12, 12), (i, 0, 0)) for i in range(12)})
    (folder / "garbage.png").write_bytes(b"not a png")
    (folder / "truncated.png").write_bytes((folder / "0.png").read_bytes()[:40])
    argv = ["--train_data_dir", str(folder), "--eval_size", "2", "--cache_dir", str(tmp_path / "cache")]
    refused(
        tmp_path,
        [*argv, "--on_corrupt_image", "stop"],
        ValueError,
        r"cannot decode image .*(garbage|truncated).*--on_corrupt_image skip",
    )
    with pytest.warns(UserWarning, match=r"skipped 2 corrupt or unreadable image\(s\) of .*imgs: .*\.png"):
        summary = train(parse_args(tiny(tmp_path / "out", *argv)))  # the default: --on_corrupt_image skip
    assert summary["optimizer_steps"] == 2  # trained on the 10 good training images


def test_a_dataset_without_an_image_column_is_refused_naming_its_columns(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    write_parquet(tmp_path / "ds" / "train.parquet", {"text": list("abcdefgh"), "label": [0] * 8}, features)
    argv = ["--dataset_name", str(tmp_path / "ds"), "--cache_dir", str(tmp_path / "cache")]
    refused(tmp_path, argv, ValueError, r"no image column found among the dataset's columns \['text', 'label'\]")


def test_fewer_images_than_one_global_batch_is_refused(tmp_path):
    """--train_batch_size is per process, so each process always gets whole images; what can fail is the data:
    fewer training images than one global batch (batch x processes; two processes: test_train_units.py)."""
    argv = ["--max_train_samples", "3"]
    refused(tmp_path, argv, ValueError, r"has 3 images, fewer than one global batch of 4 \(--train_batch_size 4 x 1")


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--loss", "l1"], "argument --loss: invalid choice: 'l1' (choose from simple, vlb, hybrid)"),
        (["--mixed_precision", "fp8"], "invalid choice: 'fp8' (choose from no, fp16, bf16)"),
        (["--ddpm_beta_schedule", "cosinus"], "invalid choice: 'cosinus' (choose from linear, scaled_linear"),
        (["--variance_type", "learned"], "invalid choice: 'learned' (choose from fixed_small, fixed_small_log,"),
        (["--on_nan", "ignore"], "argument --on_nan: invalid choice: 'ignore' (choose from stop, skip)"),
        (["--on_corrupt_image", "keep"], "invalid choice: 'keep' (choose from skip, stop)"),
        (["--ddpm_num_steps", "many"], "argument --ddpm_num_steps/--num_train_timesteps: invalid int value: 'many'"),
    ],
)
def test_unknown_option_values_name_the_allowed_ones(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    unquoted = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting the choices
    assert exit_info.value.code == 2 and shown.replace("'", "") in unquoted


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--ddpm_num_steps", "0"], "--ddpm_num_steps must be >= 1, got 0"),  # T < 1
        (["--ddpm_num_inference_steps", "0"], "--ddpm_num_inference_steps must be >= 1, got 0"),
        (["--ddpm_num_inference_steps", "-5"], "--ddpm_num_inference_steps must be >= 1, got -5"),
    ],
)
def test_bad_counts_are_refused_when_parsed(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_options_known_only_once_the_model_is_chosen_are_refused_at_start_up(tmp_path):
    refused(tmp_path, ["--ddpm_num_inference_steps", "51"], ValueError, r"51 exceeds the 50 training timesteps \(T\)")
    refused(tmp_path, ["--ddpm_num_steps", "10"], ValueError, r"scaled to T=10 ends at beta=2 >= 1; use --ddpm_num")
    refused(
        tmp_path,
        ["--model_config", "tiny"],
        ValueError,
        r"'tiny' is neither a preset \(.*digits-16-tiny.*\) nor a JSON file",
    )


def test_beta_out_of_range_names_the_timestep_and_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"beta at timestep 666 is 1.00003.*; every beta must lie in .*\(0, 1\)"):
        HFDDPMScheduler(beta_end=1.5)
    HFDDPMScheduler().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text()) | {"beta_start": -0.1}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"beta at timestep 0 is -0.1"):
        HFDDPMScheduler.from_pretrained(tmp_path)


def test_learned_range_needs_the_extra_output_channels_at_training_start_up(tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(unet_config("test-tiny", in_channels=1, out_channels=1, sample_size=8)))
    refused(
        tmp_path,
        ["--model_config", str(config), "--loss", "hybrid"],
        ValueError,
        r"the UNet has 1 output channels; 1-channel data with learned_range \(mean and variance\) needs 2",
    )
    tiny_pipeline(
        tmp_path / "fixed", num_train_timesteps=50, in_channels=1, out_channels=1, sample_size=8
    )  # fine-tune a fixed-variance one
    model = ["--pretrained_model_name_or_path", str(tmp_path / "fixed")]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--loss hybrid needs variance_type learned_range; the scheduler has 'fixed"):
        train(parse_args(tiny(out, "--loss", "hybrid", model=model)))
    assert not out.exists()
    pipe = tiny_pipeline(variance_type="learned_range")  # and when sampling: the step names the channel counts
    with pytest.raises(ValueError, match=r"learned_range' needs a model with 2 × 3 output channels .* got 3"):
        pipe(num_inference_steps=2)


# ------------------------------------------------------------------------------------------------ loading


def test_a_directory_without_model_index_json_is_not_a_pipeline(tmp_path):
    tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "pipe" / "model_index.json").unlink()
    for path in (tmp_path / "pipe", tmp_path):  # components without an index; an empty directory
        with pytest.raises(ValueError, match=f"{path} holds no model_index.json: it is not a saved pipeline"):
            HFDDPMPipeline.from_pretrained(path)
    with pytest.raises(OSError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    model = ["--pretrained_model_name_or_path", str(tmp_path / "pipe")]  # fine-tuning from it
    with pytest.raises(ValueError, match="pipe holds no model_index.json"):
        train(parse_args(tiny(tmp_path / "out", model=model)))
    assert not (tmp_path / "out").exists()


def test_an_index_of_another_kind_of_pipeline_is_refused(tmp_path):
    tiny_pipeline(tmp_path)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(ValueError, match=r"holds a StableDiffusionPipeline with unet=\['diffusers', 'UNet2DCond"):
        HFDDPMPipeline.from_pretrained(tmp_path)


def test_missing_or_mismatched_weights_name_the_file_and_the_tensor(tmp_path):
    tiny_pipeline(tmp_path / "missing")
    (tmp_path / "missing" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match=r"missing/unet holds no weights and no diffusion_pytorch_model.safetensors"):
        HFDDPMPipeline.from_pretrained(tmp_path / "missing")
    tiny_pipeline(tmp_path / "mismatched")  # the config says 16 and 32 channels; the weights have 8 and 16
    config_path = tmp_path / "mismatched" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"block_out_channels": [16, 32]}))
    match = r"mismatched/unet do not fit its config.json \(conv_in.bias expected shape torch.Size\(\[16\]\), but got"
    with pytest.raises(ValueError, match=match):
        HFDDPMPipeline.from_pretrained(tmp_path / "mismatched")


def save_config(path, config: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "scheduler_config.json").write_text(json.dumps(config))
    return path


def test_scheduler_configs_of_compatible_schedulers_load_their_schedule(tmp_path):
    """Documented behaviour: a config of a scheduler diffusers lists as compatible gives its β schedule, T,
    prediction type and spacing; the rest take HFDDPMScheduler's defaults (as DDPMScheduler.from_config does)."""
    DDIMScheduler(num_train_timesteps=40, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  timestep_spacing="trailing").save_pretrained(tmp_path / "ddim")  # fmt: skip
    ours = HFDDPMScheduler.from_pretrained(tmp_path / "ddim")
    assert (ours.config.num_train_timesteps, ours.config.beta_schedule, ours.config.prediction_type) == (
        40, "squaredcos_cap_v2", "v_prediction")  # fmt: skip
    assert ours.config.timestep_spacing == "trailing" and ours.config.variance_type == "fixed_small"
    EulerDiscreteScheduler(num_train_timesteps=30).save_pretrained(tmp_path / "euler")
    assert HFDDPMScheduler.from_pretrained(tmp_path / "euler").config.num_train_timesteps == 30


@pytest.mark.parametrize(
    "config, match",
    [
        ({"diffusion_steps": 4000, "noise_schedule": "cosine", "learn_sigma": True},  # improved-diffusion's flags
         r"has none of HFDDPMScheduler's keys \(it has \['diffusion_steps', 'learn_sigma', 'noise_schedule'\]\)"),
        ({"_class_name": "UNet2DModel", "sample_size": 32}, "a UNet2DModel config cannot configure HFDDPMScheduler"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
         "a FlowMatchEulerDiscreteScheduler config cannot configure"),
    ],
)  # fmt: skip
def test_a_scheduler_config_from_another_library_or_class_is_refused(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        HFDDPMScheduler.from_pretrained(save_config(tmp_path, config))
    pipe = tiny_pipeline(tmp_path / "pipe")
    save_config(tmp_path / "pipe" / "scheduler", config)
    with pytest.raises(ValueError, match=match):
        HFDDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.num_train_timesteps == 20


def test_an_edm_config_has_no_beta_schedule_for_ddpm(tmp_path):
    EDMEulerScheduler().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"a EDMEulerScheduler config cannot configure .* holds no β schedule"):
        HFDDPMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, FlowMatchEulerDiscreteScheduler])
def test_an_in_memory_config_without_a_beta_schedule_is_refused_as_its_folder_is(tmp_path, scheduler_class):
    """`scheduler.config` names no class (only a saved one does): judged by its keys, it is refused as the folder is,
    instead of silently giving DDPM's default linear betas."""
    other = scheduler_class()
    assert "_class_name" not in other.config
    with pytest.raises(
        ValueError, match=r"a config with foreign keys \[.*\] cannot configure HFDDPMScheduler: it holds no β"
    ):
        HFDDPMScheduler.from_config(other.config)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"a {scheduler_class.__name__} config cannot configure .* holds no β"):
        HFDDPMScheduler.from_pretrained(tmp_path)


def test_in_memory_configs_of_our_keys_and_of_compatible_schedulers_still_load():
    partial = HFDDPMScheduler.from_config({"num_train_timesteps": 100})  # a partial dict of our own keys
    assert partial.config.num_train_timesteps == 100 and partial.config.beta_schedule == "linear"
    ours = HFDDPMScheduler(num_train_timesteps=30, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    assert HFDDPMScheduler.from_config(ours.config).config == ours.config
    import diffusers

    from hf_ddpm.scheduler_configs import CONFIG_SOURCES

    loaded = 0
    for name in CONFIG_SOURCES:  # every compatible scheduler's in-memory config: its T and β schedule
        if not hasattr(diffusers, name) or name == "DDPMScheduler":
            continue
        try:
            other = getattr(diffusers, name)(num_train_timesteps=40)
        except ImportError:  # a scheduler that needs an extra package (scipy's, torchsde's)
            continue
        if "beta_schedule" not in other.config:  # EDMEulerScheduler, listed by diffusers: refused (the test above)
            continue
        assert "_class_name" not in other.config
        ddpm = HFDDPMScheduler.from_config(other.config)
        assert ddpm.config.num_train_timesteps == 40, name
        assert ddpm.config.beta_schedule == other.config.beta_schedule, name
        loaded += 1
    assert loaded >= 10


# ------------------------------------------------------------------------------------------------ pipeline inputs


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randint(0, 256, (2, 3, 8, 8)), r"uint8 pixel values 0..255, got dtype torch.int64"),
        (np.random.default_rng(0).random((2, 3, 8, 8)), "got dtype torch.float64; scale float images in"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.bool), "got dtype torch.bool"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"shape \(N, 3, 8, 8\) to match the UNet, got \(3, 8, 8\)"),
        ([Image.new("RGB", (9, 9))], r"images must be 8x8 \(the UNet's sample_size\), got sizes \[\(9, 9\)\]"),
        ([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))], "a non-empty list of PIL images"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), r"images holds no image: shape \(0, 3, 8, 8\); pass at least one"),
    ],
)
def test_bits_per_dim_refuses_values_that_are_not_uint8_images_of_the_model_shape(images, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline().bits_per_dim(images)
