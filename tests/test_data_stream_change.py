"""A --streaming run over an image folder whose files were deleted or added since its checkpoint, resumed with
--allow_data_change (go on with the data as it is now): an example of the saved shuffle buffer whose file is gone is
dropped, and the stream goes on after the last file it read in the changed list, so no image left in the folder is
skipped or read twice in the epoch; one warning says so, naming the dropped file. Without the flag the resume is
refused as before. Through the real command line (`accelerate launch training/train.py`), and in process for the
places a changed stream can be put (stream_change.py)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from hub_clients import tree_hashes
from image_files import ids, write_images
from PIL import Image
from training_runs import REPO, TIMEOUT, environment, launch, launch_command, launch_flags

from hf_ddpm.data.streaming import StreamingBatches, open_streaming
from hf_ddpm.training.output_dir import LOCK_NAME

RUN = ["--streaming", "--shuffle_buffer_size", "16", "--max_train_steps", "8", "--checkpointing_steps", "1",
       "--save_images_steps", "1000"]  # fmt: skip
WARNING = "--allow_data_change: the stream of "


def position(checkpoint) -> dict:
    """The stream's saved position of the run's one process."""
    (state,) = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)["processes"]
    return state


def paths(values) -> list[str]:
    return [v["path"] for v in values]


def read(state, listed: int) -> int:
    """How many of its `listed` files the stream has read: datasets' own count (an image folder is one shard, and
    shard 1 its end)."""
    count = state["stream"]["examples_iterable"]
    return count["shard_example_idx"] if count["shard_idx"] == 0 else listed


def test_deleted_and_added_files_resume_with_allow_data_change_skipping_and_repeating_none(tmp_path):
    """An 8-step run over 40 images (16 examples buffered, a checkpoint at every step), resumed from step 2 after
    three files are deleted (one waiting in the saved buffer, one trained on, one not read yet) and two added (one
    sorted before the last file read, one after)."""
    images, out = tmp_path / "images", tmp_path / "out"
    flags = launch_flags(out, "--train_data_dir", write_images(images, 40), *RUN)
    launch(flags)
    for step in range(3, 9):  # the run stopped after step 2 ...
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "training_summary.json").unlink()  # ... so it never finished
    saved = position(out / "checkpoint-2")
    buffered, listed = paths(saved["buffer"]), sorted(str(p) for p in images.glob("*.png"))
    assert read(saved, 40) == 23 and len(buffered) == 15  # 8 images drawn, 23 read: 15 wait in the buffer
    last = listed[22]
    trained = sorted(set(listed[:23]) - set(buffered))
    gone = [buffered[0], trained[0], listed[-1]]
    added = [str(images / "00005x.png"), str(images / "00030x.png")]
    for path in gone:
        os.remove(path)
    for i, path in enumerate(added):
        Image.new("RGB", (12, 10), (200 + i, 0, 7)).save(path)
    flags += ["--resume_from_checkpoint", "latest"]

    before = tree_hashes(out)
    command = launch_command(flags)
    refused = subprocess.run(command[:3] + ["--quiet"] + command[3:], cwd=REPO, env=environment(),
                             capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert refused.returncode == 1 and refused.stderr.count("error: ") == 1, refused.stderr[-3000:]
    assert "since checkpoint-2" in refused.stderr and "--allow_data_change to go on" in refused.stderr
    assert unlocked(tree_hashes(out)) == unlocked(before)

    log = launch(flags + ["--allow_data_change"])
    said = [line for line in log.splitlines() if WARNING in line]
    assert len(said) == 1, said
    assert (
        f"1 file(s) of the checkpoint's shuffle buffer are gone and dropped ({gone[0]}); the stream goes on after "
        f"the last file it read, {last}; files added before that place are first read in the next epoch"
    ) in said[0]
    (change,) = [line for line in log.splitlines() if "--allow_data_change: " in line and WARNING not in line]
    assert "since checkpoint-2" in change and change.endswith(  # a folder streamed has no test split: nothing held out
        ": its training images are not the same (the run holds out no images); resuming with the data as it is now"
    )
    assert "held-out" not in change and "drawn again" not in change
    assert f"resumed from {out / 'checkpoint-2'} at optimizer step 2" in log
    assert json.loads((out / "checkpoint-8" / "run_record.json").read_text())["step"] == 8
    assert json.loads((out / "training_summary.json").read_text())["optimizer_steps"] == 8

    # What each resumed step drew, from the positions of checkpoints 2..8: the buffer before it and the files read
    # (the changed list's, after the last one read before) less the buffer after it.
    now = sorted(str(p) for p in images.glob("*.png"))
    pending, at, drawn = [p for p in buffered if p != gone[0]], now.index(last), []
    for step in range(3, 9):
        state = position(out / f"checkpoint-{step}")
        upto = read(state, len(now)) - 1
        assert state.get("read", now[upto]) == now[upto]  # the path saved beside the count
        pending, kept = pending + now[at + 1 : upto + 1], paths(state["buffer"])
        step_drew = list(pending)
        for p in kept:
            step_drew.remove(p)
        assert len(step_drew) == 4, (step, step_drew)  # one batch
        drawn, pending, at = drawn + step_drew, kept, upto
    # every image of the changed folder not trained on before the checkpoint, once: drawn, buffered or still unread
    # (the one added before the last file read comes in the next epoch)
    assert sorted(drawn + pending + now[at + 1 :]) == sorted(set(now) - set(trained) - {added[0]})
    assert gone[0] not in drawn and added[1] in drawn + pending + now[at + 1 :]


@pytest.mark.slow  # two 2-process launches
def test_a_two_process_resume_drops_each_processs_vanished_files_and_says_so_once(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    flags = launch_flags(out, "--train_data_dir", write_images(images, 80), *RUN[:-4], "--max_train_steps", "6",
                         "--checkpointing_steps", "2", "--save_images_steps", "1000")  # fmt: skip
    launch(flags, num_processes=2)
    shutil.rmtree(out / "checkpoint-6")  # the run stopped after step 2 ...
    shutil.rmtree(out / "checkpoint-4")
    (out / "training_summary.json").unlink()  # ... so it never finished
    states = torch.load(out / "checkpoint-2" / "custom_checkpoint_1.pkl", weights_only=False)["processes"]
    gone = sorted(paths(state["buffer"])[0] for state in states)  # one of each process's buffer
    for path in gone:
        os.remove(path)
    log = launch(flags + ["--resume_from_checkpoint", "latest", "--allow_data_change"], num_processes=2)
    said = [line for line in log.splitlines() if WARNING in line]
    assert len(said) == 1, said
    assert f"2 file(s) of the checkpoint's shuffle buffer are gone and dropped ({gone[0]}, {gone[1]})" in said[0]
    assert "; the stream process 0 goes on after the last file it read, " in said[0]
    assert "; process 1 goes on after the last file it read, " in said[0]
    assert json.loads((out / "checkpoint-6" / "run_record.json").read_text())["step"] == 6


def unlocked(hashes: dict) -> dict:
    return {name: digest for name, digest in hashes.items() if name != LOCK_NAME}


def batches(folder, process=0, processes=1):
    make_stream, column, info, _, source = open_streaming(train_data_dir=folder, resolution=4, eval_size=0, channels=3)
    return StreamingBatches(
        make_stream, column, batch_size=4, num_processes=processes, process_index=process, seed=0, buffer_size=8,
        num_workers=0, resolution=4, channels=3, skip_corrupt=True, device="cpu", source=source, key=info.key,
    )  # fmt: skip


def test_a_stream_whose_last_file_read_is_gone_goes_on_after_the_files_that_sort_before_it(tmp_path, caplog):
    folder = write_images(tmp_path / "f", 24)
    b = batches(folder)
    seen = [ids(b.batch(step)) for step in range(2)]  # 8 drawn of 15 read
    state = b.state_dict()
    mine = state["processes"][0]
    assert mine["read"].endswith("00014.png") and mine["key"] == b.key
    (tmp_path / "f" / "00014.png").unlink()  # the last file read (and buffered, or trained on)
    resumed = batches(folder)
    with caplog.at_level("WARNING", logger="hf_ddpm.data.streaming"):
        resumed.load_state_dict(state)
    (said,) = [r.getMessage() for r in caplog.records]
    assert f"goes on after the files that sort before the last file it read, {mine['read']} (gone too)" in said
    trained = [i for s in seen for i in s]  # 14 among them, or dropped from the buffer
    rest = [i for step in range(2, 6) for i in ids(resumed.batch(step))]  # the rest of the epoch
    assert sorted(rest + trained) == sorted(set(range(24)) - {14} | set(trained))
    assert resumed.state_dict()["processes"][0]["key"] == resumed.key != b.key  # the next checkpoint: the new files


def test_an_unchanged_stream_resumes_exactly_and_says_nothing(tmp_path, caplog):
    folder = write_images(tmp_path / "f", 24)
    b, reference = batches(folder), batches(folder)
    expected = [reference.batch(step) for step in range(6)]
    for step in range(2):
        b.batch(step)
    resumed = batches(folder)
    with caplog.at_level("WARNING", logger="hf_ddpm.data.streaming"):
        resumed.load_state_dict(b.state_dict())
    assert not caplog.records
    assert all(torch.equal(resumed.batch(step), expected[step]) for step in range(2, 6))
