"""Short training runs inside the test process (hf_ddpm.training.train): precision, objectives, data, fine-tuning,
the LR curve under gradient accumulation, and the guards around the output directory."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from training_runs import reset_accelerate, scalars, tiny

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.hub import HubPushError
from hf_ddpm.training import parse_args, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def test_bf16_autocast_is_active_inside_the_unet_on_cpu(tmp_path):
    dtypes = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():  # training forwards only
            dtypes.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = train(parse_args(tiny(tmp_path / "out", "--mixed_precision", "bf16", "--no-use_ema")))
    finally:
        handle.remove()
    assert summary["mixed_precision"] == "bf16"
    assert dtypes and set(dtypes) == {torch.bfloat16}
    unet = HFDDPMPipeline.from_pretrained(tmp_path / "out").unet
    assert unet.dtype == torch.float32  # master weights (and the saved pipeline) stay float32


def test_the_lr_follows_its_curve_in_optimizer_steps_under_gradient_accumulation(tmp_path):
    out = tmp_path / "out"
    train(
        parse_args(
            tiny(
                out,
                "--max_train_steps",
                "8",
                "--gradient_accumulation_steps",
                "3",
                "--lr_warmup_steps",
                "3",
                "--learning_rate",
                "1e-3",
                "--lr_scheduler",
                "cosine",
                "--checkpointing_steps",
                "100",
            )
        )
    )
    lrs = scalars(out, "lr")
    assert sorted(lrs) == list(range(1, 9))  # one log per optimizer step (3 micro-steps each)
    for step, lr in lrs.items():  # LR after `step` optimizer steps: warmup 3, cosine to 0 at step 8
        expected = 1e-3 * (step / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * (step - 3) / 5)))
        assert lr == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert lrs[8] == 0.0
    for tag in ("loss", "grad_norm", "images_per_sec", "bits_per_dim"):
        assert scalars(out, tag)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["images_per_optimizer_step"] == 12 and summary["optimizer_steps"] == 8


def test_hybrid_loss_trains_a_learned_variance_model(tmp_path):
    out = tmp_path / "out"
    train(parse_args(tiny(out, "--loss", "hybrid", "--channels_last", "--random_flip")))
    pipe = HFDDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.unet.config.out_channels == 2
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_vlb_with_importance_sampling_checkpoints_the_sampler(tmp_path):
    out = tmp_path / "out"
    train(parse_args(tiny(out, "--loss", "vlb", "--importance_sampling", "--checkpointing_steps", "2")))
    # EMA, sampler: two registered objects, the sampler's history holds 2 steps x 4 losses
    state = torch.load(out / "checkpoint-2" / "custom_checkpoint_1.pkl", weights_only=False)
    assert int(state["loss_counts"].sum()) == 8
    assert np.isfinite(scalars(out, "loss")[2])


def test_an_image_folder_of_rgb_images_adapts_the_preset_to_three_channels(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        PIL.Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    train(parse_args(tiny(out, "--train_data_dir", str(folder), "--eval_size", "4")))
    pipe = HFDDPMPipeline.from_pretrained(out)
    assert (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == (3, 8)
    assert PIL.Image.open(out / "samples.png").mode == "RGB"


def test_fine_tuning_starts_from_a_pipeline_and_keeps_its_scheduler(tmp_path):
    base = tmp_path / "base"
    train(parse_args(tiny(base, "--prediction_type", "v_prediction")))
    pretrained = ("--pretrained_model_name_or_path", str(base))
    with pytest.raises(ValueError, match="keeps the pretrained scheduler's prediction_type='v_prediction'"):
        train(parse_args(tiny(tmp_path / "bad", "--prediction_type", "epsilon", model=pretrained)))
    reset_accelerate()
    tuned = tmp_path / "tuned"
    train(parse_args(tiny(tuned, "--learning_rate", "0", "--no-use_ema", model=pretrained)))
    before, after = (HFDDPMPipeline.from_pretrained(p) for p in (base, tuned))
    assert after.scheduler.config.prediction_type == "v_prediction"
    for (name, a), b in zip(before.unet.state_dict().items(), after.unet.state_dict().values()):
        assert torch.equal(a, b), name  # learning rate 0: the fine-tuned weights are the pretrained ones


def test_an_earlier_run_is_not_overwritten_by_accident(tmp_path):
    out = tmp_path / "out"
    train(parse_args(tiny(out, "--checkpointing_steps", "1")))
    reset_accelerate()
    with pytest.raises(ValueError, match="holds an earlier run.*--resume_from_checkpoint latest"):
        train(parse_args(tiny(out)))
    reset_accelerate()
    train(parse_args(tiny(out, "--overwrite_output_dir", "--checkpointing_steps", "100")))
    assert not list(out.glob("checkpoint-*"))


def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set, so hf_ddpm does not push"):
        train(parse_args(tiny(tmp_path / "out", "--push_to_hub", "--hub_model_id", "me/digits")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compile_trains_and_saves_a_plain_pipeline(tmp_path):
    """--compile: inductor compiles the training forward (minutes on a CPU); sampling and the saved pipeline are
    the plain module (no `_orig_mod.` prefixes in the weights)."""
    out = tmp_path / "out"
    try:
        train(parse_args(tiny(out, "--compile")))
    finally:
        torch._dynamo.reset()
    pipe = HFDDPMPipeline.from_pretrained(out)
    assert not any(key.startswith("_orig_mod") for key in pipe.unet.state_dict())
    images = pipe(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert np.isfinite(images).all()
