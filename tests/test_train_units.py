"""Training building blocks without a training run: options, batches, checkpoint files, the LR curve, grids."""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.optimization import get_scheduler

from hf_ddpm.data.batches import ShardedBatches, step_generator, to_model_input
from hf_ddpm.images import make_grid
from hf_ddpm.training import build_parser, checkpoints
from hf_ddpm.training.checkpoints import RunRecord
from hf_ddpm.training.cli import parse_args
from hf_ddpm.training.resolve import RunFacts, resolve

# ---------------------------------------------------------------- options


def test_defaults_train_the_digits_model_with_diffusers_flag_names():
    args = resolve(parse_args([]), RunFacts())[0]
    assert args.model_config is None and args.dataset_name is None  # digits-16-tiny on the bundled digits
    assert args.use_ema and args.center_crop and args.loss == "simple" and args.lr_scheduler == "cosine"
    args = parse_args(
        [
            "--num_train_timesteps",
            "400",
            "--beta_schedule",
            "cosine",
            "--model_config_name_or_path",
            "test-tiny",
            "--random_crop",
            "--no-use_ema",
        ]
    )
    assert (args.ddpm_num_steps, args.ddpm_beta_schedule, args.model_config) == (400, "cosine", "test-tiny")
    assert not args.center_crop and not args.use_ema


def test_every_option_is_documented_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    undocumented = [a.dest for a in build_parser()._actions if a.option_strings and not a.help]
    assert undocumented == []
    assert "(default: 64)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fp16_without_cuda_is_a_clear_error_that_suggests_bf16(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*bf16"):
        parse_args(["--mixed_precision", "fp16", "--output_dir", str(tmp_path / "out")])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(ValueError, match="bf16"):
        parse_args(["--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert resolve(parse_args(["--mixed_precision", "bf16"]), RunFacts())[0].mixed_precision == "bf16"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--loss", "hybrid", "--variance_type", "fixed_small"], "learned_range"),
        (["--variance_type", "learned_range"], "untrained"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1, got 0"),
        (["--learning_rate", "-1"], "--learning_rate must be >= 0"),
        (["--save_images_steps", "5", "--save_images_epochs", "1"], "not both"),
        (["--hub_model_id", "me/model"], "--hub_model_id only applies with --push_to_hub"),
        (["--hub_model_id", "me/model", "--hub_private_repo"], "--hub_model_id, --hub_private_repo only apply with"),
        (["--dataset_name", "x", "--train_data_dir", "y"], "not both"),
        (["--model_config", "test-tiny", "--pretrained_model_name_or_path", "p"], "pass one"),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "pass one"),
    ],
)
def test_bad_option_combinations_are_rejected(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_hybrid_implies_learned_range_and_the_token_is_never_serialized():
    assert resolve(parse_args(["--loss", "hybrid"]), RunFacts())[0].variance_type == "learned_range"
    args = parse_args(["--push_to_hub", "--hub_token", "secret", "--hub_model_id", "me/m"])
    assert "hub_token" not in args.to_json() and args.to_json()["hub_model_id"] == "me/m"


# ---------------------------------------------------------------- batches


def test_sharded_batches_split_each_global_batch_between_processes():
    images = torch.arange(22, dtype=torch.uint8).view(22, 1, 1, 1)
    shards = [ShardedBatches(images, 3, 2, rank, seed=5) for rank in range(2)]
    assert shards[0].batches_per_epoch == 3  # 22 // (3 x 2): the partial global batch is dropped
    for micro_step in range(7):
        a, b = (s.indices(micro_step) for s in shards)
        assert len(a) == len(b) == 3 and not set(a.tolist()) & set(b.tolist())
    epoch0 = torch.cat([s.indices(m) for m in range(3) for s in shards])
    assert len(set(epoch0.tolist())) == 18  # no image twice within an epoch
    epoch1 = torch.cat([s.indices(m) for m in range(3, 6) for s in shards])
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch
    assert shards[0].position(7) == (2, 1)
    fresh = ShardedBatches(images, 3, 2, 1, seed=5)  # a resumed process: found by arithmetic, not by iterating
    assert torch.equal(fresh.batch(4), shards[1].batch(4))
    assert torch.equal(shards[0].batch(4).view(-1).long(), shards[0].indices(4))


def test_batches_need_one_global_batch_and_inputs_are_scaled_to_plus_minus_one():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        ShardedBatches(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), 8, 2, 0, seed=0)
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3)
    x = to_model_input(images, step_generator(0, 0, 0, "cpu"), flip=False)
    assert x.dtype == torch.float32 and x.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    pair = images[..., :2]  # (0, 255): a flip swaps -1 and 1
    flips = [to_model_input(pair, step_generator(0, 0, m, "cpu"), flip=True)[0, 0, 0, 0].item() for m in range(40)]
    assert set(flips) == {-1.0, 1.0}  # flipped in some steps, not in others
    assert torch.equal(
        torch.randn(3, generator=step_generator(1, 0, 7, "cpu")),
        torch.randn(3, generator=step_generator(1, 0, 7, "cpu")),
    )
    assert not torch.equal(
        torch.randn(3, generator=step_generator(1, 0, 7, "cpu")),
        torch.randn(3, generator=step_generator(1, 1, 7, "cpu")),
    )


# ---------------------------------------------------------------- checkpoint files


def test_latest_ignores_incomplete_checkpoints_and_pruning_keeps_the_newest(tmp_path):
    for name in ("checkpoint-5", "checkpoint-20", "checkpoint-100", "checkpoint-300.tmp", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-400").write_text("a file, not a checkpoint")
    assert [s for s, _ in checkpoints.list_checkpoints(str(tmp_path))] == [5, 20, 100]
    assert checkpoints.resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-100")
    assert checkpoints.resolve_resume("checkpoint-20", str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert checkpoints.resolve_resume("latest", str(tmp_path / "empty")) is None  # a fresh start
    with pytest.raises(ValueError, match="incomplete"):
        checkpoints.resolve_resume(str(tmp_path / "checkpoint-300.tmp"), str(tmp_path))
    with pytest.raises(ValueError, match="no such checkpoint"):
        checkpoints.resolve_resume("checkpoint-7", str(tmp_path))
    with pytest.raises(ValueError, match=r"; use 'latest' or one of \[.*checkpoint-5', .*checkpoint-100'\]$"):
        checkpoints.resolve_resume("checkpoint-7", str(tmp_path))
    with pytest.raises(ValueError, match=r"empty holds no checkpoints: name a checkpoint directory that exists"):
        checkpoints.resolve_resume("checkpoint-7", str(tmp_path / "empty"))  # not "one of []"
    removed = checkpoints.prune_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in removed] == ["checkpoint-5"]
    assert [s for s, _ in checkpoints.list_checkpoints(str(tmp_path))] == [20, 100]
    checkpoints.remove_incomplete(str(tmp_path))
    assert not (tmp_path / "checkpoint-300.tmp").exists() and (tmp_path / "checkpoint-x").exists()


class _FakeAccelerator:
    """What `save_checkpoint` uses of an Accelerator, for one process; save_state writes one file."""

    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        assert os.path.isdir(path) and path.endswith(".tmp")
        with open(os.path.join(path, "model.safetensors"), "w") as f:
            f.write("weights")


def record(step: int) -> RunRecord:
    config = resolve(parse_args(["--train_batch_size", "4"]), RunFacts())[0]
    return RunRecord.of_run(step, {"in_channels": 1, "_class_name": "UNet2DModel"}, OBJECTIVE, config, 1)


OBJECTIVE = {"num_train_timesteps": 50, "beta_schedule": "linear", "beta_start": 0.002, "beta_end": 0.4,
             "prediction_type": "epsilon", "variance_type": "fixed_small"}  # fmt: skip


def test_save_checkpoint_renames_a_complete_directory_and_replaces_an_old_one(tmp_path):
    accelerator = _FakeAccelerator()
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a leftover of a killed run
    for step in (1, 2, 3, 2):
        checkpoints.save_checkpoint(accelerator, str(tmp_path), record(step), total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_text() == "weights"
    assert RunRecord.read(str(tmp_path / "checkpoint-3")) == record(3)  # by its name, whatever else the state holds
    saved = RunRecord.read(str(tmp_path / "checkpoint-2"))
    assert saved.step == 2 and saved.unet == {"in_channels": 1} and saved.launch.mixed_precision == "no"
    assert saved.objective == {**OBJECTIVE, "loss": "simple"} and saved.batch["train_batch_size"] == 4


# ---------------------------------------------------------------- LR curve


def expected_lr(step, peak, warmup, total, kind):
    """The intended curve, in optimizer steps: linear warmup, then cosine or linear decay to 0 at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_the_lr_schedule_counts_optimizer_steps(kind):
    """The loop builds the schedule in optimizer steps and steps it once per optimizer step (not per micro-step,
    not num_processes times as accelerate's AcceleratedScheduler would): this is the curve it then follows."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=4, num_training_steps=20)
    lrs = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([expected_lr(s, 1e-3, 4, 20, kind) for s in range(1, 21)], abs=1e-12)


# ---------------------------------------------------------------- grids


def test_make_grid_tiles_row_by_row():
    images = np.zeros((5, 4, 3, 1), dtype=np.float32)
    images[3] = 1.0
    grid = make_grid(images, padding=1)
    assert isinstance(grid, PIL.Image.Image) and grid.mode == "L"
    assert grid.size == (3 * 4 + 1, 2 * 5 + 1)  # 2 rows of 3 columns (W=3, H=4), padding 1
    pixels = np.asarray(grid)
    assert (pixels[6:10, 1:4] == 255).all() and (pixels[1:5, 1:4] == 0).all()  # image 3 starts row 2
    rgb = make_grid(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), padding=0)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        make_grid(np.zeros((2, 3, 3, 2)))
