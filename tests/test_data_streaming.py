"""--streaming (hf_ddpm.data.streaming): datasets streaming of local parquet files and image folders, split over
processes, shuffled by a checkpointable buffer, decoded in worker processes; a checkpoint's position resumes at
exactly the next batch (in process, and a real 2-process `accelerate launch` killed with SIGKILL ends with the same
weights as an uninterrupted run)."""

import contextlib
import os
import re
import signal
import subprocess
import time

import datasets
import psutil
import pytest
import torch
from PIL import Image
from training_runs import REPO, TIMEOUT, environment, launch, launch_command, launch_flags, weights

from hf_ddpm.data.streaming import StreamingBatches, open_streaming

FEATURES = datasets.Features({"image": datasets.Image()})
N = 60


def write_shards(folder, n=N, shards=2):
    """Parquet shards of n solid 10x10 images; image i has colour (i, 255 - i, 9)."""
    folder.mkdir(parents=True, exist_ok=True)
    per = n // shards
    for s in range(shards):
        images = [Image.new("RGB", (10, 10), (i, 255 - i, 9)) for i in range(s * per, (s + 1) * per)]
        datasets.Dataset.from_dict({"image": images}, features=FEATURES).to_parquet(str(folder / f"{s}.parquet"))
    return sorted(str(p) for p in folder.glob("*.parquet"))


def ids(batch: torch.Tensor) -> list[int]:
    assert (batch[:, 2] == 9).all()
    return batch[:, 0, 0, 0].tolist()


def batches_of(files, rank=0, world=1, workers=0, buffer=16, batch=4):
    make_stream, column, info, _, _ = open_streaming(train_data_files=files, resolution=4, eval_size=0)
    assert info.shape[1:] == (3, 4, 4)
    return StreamingBatches(
        make_stream, column, batch_size=batch, num_processes=world, process_index=rank, seed=0, buffer_size=buffer,
        num_workers=workers, resolution=4, channels=3, skip_corrupt=True, device="cpu",
    )  # fmt: skip


def test_one_epoch_over_two_processes_is_every_image_once_and_shuffled(tmp_path):
    files = write_shards(tmp_path / "d")
    seen = []
    for rank in (0, 1):
        b = batches_of(files, rank, 2, batch=5)
        for step in range(N // 2 // 5):  # each process holds one of the two shards: 30 images, 6 batches
            seen += ids(b.batch(step))
    assert sorted(seen) == list(range(N)) and seen != sorted(seen)
    with pytest.raises(ValueError, match="micro-step 9 asked, 6 is next"):
        b.batch(9)


def test_a_checkpointed_position_resumes_at_exactly_the_next_batch(tmp_path):
    files = write_shards(tmp_path / "d")
    reference = batches_of(files)
    expected = [ids(reference.batch(step)) for step in range(40)]  # 160 images: past two epoch ends
    assert sorted(sum(expected[:15], [])) == list(range(N))  # the first epoch: every image once
    for stop in (3, 14, 22):
        run = batches_of(files)
        for step in range(stop):
            run.batch(step)
        state = run.state_dict()
        resumed = batches_of(files)
        resumed.load_state_dict(state)
        assert [ids(resumed.batch(step)) for step in range(stop, 40)] == expected[stop:]
    decoded_apart = batches_of(files, workers=1)  # decoded in a worker process: the same batches
    assert [ids(decoded_apart.batch(step)) for step in range(5)] == expected[:5]


def test_image_folder_stream_holds_out_the_first_images_of_its_test_split(tmp_path):
    for split, numbers in (("train", range(5)), ("test", range(100, 103))):
        (tmp_path / "f" / split).mkdir(parents=True)
        for i in numbers:
            Image.new("L", (6, 6), i).save(tmp_path / "f" / split / f"{i}.png")
    _, _, info, held_out, source = open_streaming(train_data_dir=str(tmp_path / "f"), resolution=4, eval_size=2)
    assert info.shape[1:] == (1, 4, 4) and held_out.shape == (2, 1, 4, 4)  # grayscale: one channel
    assert held_out[:, 0, 0, 0].tolist() == [100, 101] and source == str(tmp_path / "f")  # the files in order


def test_streaming_refuses_an_unknown_length_without_max_train_steps_and_the_digits():
    from hf_ddpm.data import load_training_data
    from hf_ddpm.training import parse_args

    with pytest.raises(ValueError, match="--streaming needs --max_train_steps"):
        load_training_data(parse_args(["--streaming", "--train_data_dir", "x"]), None, 8, None)
    with pytest.raises(ValueError, match="--streaming needs --dataset_name, --train_data_dir or --train_data_files"):
        load_training_data(parse_args(["--streaming", "--max_train_steps", "5"]), None, 8, None)


@pytest.mark.slow  # two 2-process runs and a resume: about a minute
def test_a_killed_two_process_streaming_run_resumes_to_the_same_weights(tmp_path):
    files = write_shards(tmp_path / "d", n=64, shards=2)
    steps = ["--streaming", "--train_data_files", ",".join(files), "--eval_size", "0", "--max_train_steps", "60",
             "--checkpointing_steps", "4", "--shuffle_buffer_size", "8", "--dataloader_num_workers", "1",
             "--save_images_steps", "1000", "--random_flip"]  # fmt: skip
    args = launch_flags(tmp_path, *steps)
    args = [*args[: args.index("--eval_size")], *args[args.index("--eval_size") + 2 :]]  # tiny's own --eval_size
    reference = tmp_path / "reference"
    launch(_with_output(args, reference), num_processes=2)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        launch_command(_with_output(args, resumed), 2), cwd=REPO, env=environment(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (resumed / "checkpoint-4").is_dir():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.02)
    finally:  # the launcher and every process under it (torchrun starts the ranks in sessions of their own)
        family = [process.pid] + [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (resumed / "model_index.json").exists(), "killed too late: the run had finished"
    log = launch(_with_output(args, resumed) + ["--resume_from_checkpoint", "latest"], num_processes=2)
    step = int(re.search(r"resumed from .*checkpoint-(\d+) at optimizer step (\d+)", log).group(2))
    assert 4 <= step < 60
    for name in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-60/model.safetensors"):
        a, b = weights(reference / name), weights(resumed / name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming from step {step}"


def _with_output(args, output_dir):
    i = args.index("--output_dir")
    return [*args[:i], "--output_dir", str(output_dir), *args[i + 2 :]]
