"""--streaming under faults: a source that vanishes, a source whose every example is garbage, a trainer killed alone.

A vanished source is not a corrupt image: the run ends in seconds with one line naming the source and the fix
(`StreamSourceError`), instead of skipping "corrupt" images epoch after epoch; corrupt images among good ones are
skipped with rate-limited warnings; the decoding workers die with their trainer, so `accelerate launch` exits at once
when the trainer alone is SIGKILLed (the kernel's OOM killer) and leaves no process behind. Real processes, real
signals, a real folder moved away; time bounds are generous (these machines are loaded)."""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import datasets
import psutil
import pytest
import torch
from PIL import Image
from training_runs import REPO, environment, launch_command, launch_flags

import hf_ddpm.data.streaming as streaming
from hf_ddpm.data.streaming import StreamingBatches, StreamSourceError, open_streaming

FEATURES = datasets.Features({"image": datasets.Image()})


def write_folder(folder, n, corrupt=()):
    """n solid 10x10 RGB images; image i has colour (i, 255 - i, 9); the names in `corrupt` hold garbage."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (10, 10), (i, 255 - i, 9)).save(folder / f"{i:04d}.png")
    for name in corrupt:
        (folder / name).write_bytes(b"not an image at all")
    return str(folder)


def batches(folder, workers=0, batch=4, accumulation=1):
    make_stream, column, info, _, source = open_streaming(train_data_dir=folder, resolution=4, eval_size=0, channels=3)
    return StreamingBatches(
        make_stream, column, batch_size=batch, num_processes=1, process_index=0, seed=0, buffer_size=8,
        num_workers=workers, resolution=4, channels=3, skip_corrupt=True, device="cpu", source=source,
        accumulation_steps=accumulation,
    )  # fmt: skip


def test_a_vanished_folder_raises_naming_it_and_keeps_the_position_of_the_last_optimizer_step(tmp_path):
    folder = write_folder(tmp_path / "f", 40)
    b = batches(folder, accumulation=2)
    for step in range(4):  # optimizer steps 1 and 2 (two micro-steps each)
        b.batch(step)
    os.rename(folder, tmp_path / "moved")
    b.batch(4)  # decoded ahead, before the move: the first micro-step of step 3 trains
    with pytest.raises(
        StreamSourceError, match=r"cannot read .*/f/\d{4}\.png of the stream .*/f \(FileNotFoundError"
    ) as e:
        b.batch(5)
    assert "not a corrupt image" in str(e.value) and "--resume_from_checkpoint latest" in str(e.value)
    assert e.value.source == folder and e.value.path.startswith(folder)
    assert b.state_dict()["processes"][0]["micro_step"] == 4  # the end of optimizer step 2, not micro-step 4's

    os.rename(tmp_path / "moved", folder)  # restored: a resume from that position reads on
    resumed = batches(folder, accumulation=2)
    resumed.load_state_dict(b.state_dict())
    reference = batches(folder, accumulation=2)
    expected = [reference.batch(step) for step in range(8)]
    assert all(torch.equal(resumed.batch(step), expected[step]) for step in range(4, 8))


def test_data_files_that_vanish_mid_stream_raise_naming_the_stream_and_the_reader_error(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):  # two parquet shards of 20 images
        images = [Image.new("RGB", (10, 10), (i, 255 - i, 9)) for i in range(20 * s, 20 * s + 20)]
        datasets.Dataset.from_dict({"image": images}, features=FEATURES).to_parquet(str(folder / f"{s}.parquet"))
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    make_stream, column, _, _, source = open_streaming(train_data_files=files, resolution=4, eval_size=0)
    b = StreamingBatches(
        make_stream, column, batch_size=4, num_processes=1, process_index=0, seed=0, buffer_size=4, num_workers=0,
        resolution=4, channels=3, skip_corrupt=True, device="cpu", source=source,
    )  # fmt: skip
    b.batch(0)
    folder.rename(tmp_path / "gone")
    with pytest.raises(StreamSourceError, match=r"the stream 2 files \(.*0\.parquet, \.\.\.\) failed while it was "
                                                r"read \(FileNotFoundError: .*\): the source vanished"):  # fmt: skip
        for step in range(1, 40):  # within the next pass at the latest
            b.batch(step)


def test_corrupt_images_are_skipped_with_a_few_named_warnings_then_a_count(tmp_path, caplog, monkeypatch):
    folder = write_folder(tmp_path / "f", 30, corrupt=[f"bad{i}.png" for i in range(10)])
    monkeypatch.setattr(streaming, "WARNING_INTERVAL", 0.0)  # the count line at once instead of after a minute
    b = batches(folder)
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.streaming"):
        seen = [b.batch(step) for step in range(15)]  # 60 images: two passes, 20 corrupt files met
    assert all(batch.shape == (4, 3, 4, 4) and (batch[:, 2] == 9).all() for batch in seen)  # only good images
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped corrupt image")]
    counted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ") and " more " in r.getMessage()]  # fmt: skip
    assert len(named) == streaming.FIRST_WARNINGS and "counted, not named" in named[-1]
    assert counted and all("in all; the latest" in m and "bad" in m for m in counted)
    assert b._skips.total >= 15  # every corrupt file of the passes read, counted

    monkeypatch.setattr(streaming, "WARNING_INTERVAL", 3600.0)
    caplog.clear()
    quiet = batches(folder)
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.data.streaming"):
        for step in range(15):
            quiet.batch(step)
    assert len(caplog.records) == streaming.FIRST_WARNINGS  # within the interval: no more lines, only the count


def test_a_stream_where_nothing_decodes_stops_after_a_pass_or_a_run_of_failures(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    write_folder(folder, 1)
    for i in range(12):
        (folder / f"{i:04d}.png").write_bytes(b"garbage")  # every image damaged (one written over)
    b = batches(str(folder))
    started = time.monotonic()
    with pytest.raises(StreamSourceError, match=r"no image of the stream .* decodes: 12 examples failed in a row "
                                                r"\(a whole pass over it; the latest .*\.png: UnidentifiedImageError"):  # fmt: skip
        for step in range(1000):
            b.batch(step)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match=r"the first image of the stream .*/f \(.*/f/0000\.png\) does not decode "
                                         r"\(UnidentifiedImageError: .*\): its channel count cannot be learned"):  # fmt: skip
        open_streaming(train_data_dir=str(folder), resolution=4, eval_size=0)  # channels not given: learned from it
    monkeypatch.setattr(streaming, "MAX_CONSECUTIVE_FAILURES", 5)
    with pytest.raises(StreamSourceError, match=r"5 examples failed in a row \(5 in a row"):
        batches(str(folder)).batch(0)


def test_a_corrupt_image_that_stops_a_streamed_run_is_the_outputs_last_line(tmp_path):
    """--on_corrupt_image stop, reached mid-run: the step bar is ended before the error, so the error line is not
    glued to the bar nor followed by it."""
    folder = write_folder(tmp_path / "data", 24, corrupt=["0023x.png"])  # read after some training steps
    argv = launch_flags(tmp_path / "out", "--streaming", "--train_data_dir", folder, "--max_train_steps", "50",
                        "--shuffle_buffer_size", "4", "--on_corrupt_image", "stop", "--save_images_steps", "1000")  # fmt: skip
    command = launch_command(argv, 1)  # `accelerate launch --quiet`: the launcher adds no traceback of its own
    result = subprocess.run(command[:3] + ["--quiet"] + command[3:], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: cannot decode image ") and "0023x.png" in last, result.stderr[-3000:]
    assert "steps:" in result.stderr and "steps:" not in last  # the bar was shown, and ended before the error


def test_a_stream_whose_first_image_is_grayscale_says_it_trains_in_grayscale(tmp_path, caplog):
    """The stream is not read ahead, so its first image decides the channels: said, with the way to train in colour
    (a map-style source looks at every image: 3 channels if any has colour)."""
    folder = write_folder(tmp_path / "data", 4)
    Image.new("L", (10, 10), 128).save(tmp_path / "data" / "0000.png")  # gray first, colour after
    with caplog.at_level(logging.WARNING):
        _, _, info, _, _ = open_streaming(train_data_dir=folder, resolution=4, eval_size=0)
    assert info.shape[1] == 1
    assert "its first image is grayscale, so the model takes 1 channel and colour images later" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_streaming(train_data_dir=write_folder(tmp_path / "colour", 4), resolution=4, eval_size=0)
    assert "grayscale" not in caplog.text


def test_decoding_workers_die_with_the_process_that_started_them(tmp_path):
    folder = write_folder(tmp_path / "f", 20)
    script = (
        "import sys\n"
        "from hf_ddpm.data.streaming import StreamingBatches, open_streaming\n"
        "if __name__ == '__main__':\n"
        "    m, c, _, _, s = open_streaming(train_data_dir=sys.argv[1], resolution=4, eval_size=0)\n"
        "    b = StreamingBatches(m, c, batch_size=4, num_processes=1, process_index=0, seed=0, buffer_size=8,\n"
        "                         num_workers=2, resolution=4, channels=3, skip_corrupt=True, device='cpu')\n"
        "    b.batch(0)\n"
        "    print('ready', flush=True)\n"
        "    import time; time.sleep(600)\n"
    )  # fmt: skip
    (tmp_path / "decode.py").write_text(script)  # a file: spawned workers import the main module by its path
    proc = subprocess.Popen([sys.executable, str(tmp_path / "decode.py"), folder], cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    family = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the two workers (and the resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)  # EOF on both pipes: no child holds them any more
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
    finally:
        proc.kill()
        for p in family:  # a failed test leaves no orphans behind either
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _launch(tmp_path, folder, *extra, num_processes=1):
    argv = launch_flags(tmp_path / "out", "--streaming", "--train_data_dir", folder, "--dataloader_num_workers", "2",
                        "--max_train_steps", "100000", "--checkpointing_steps", "4", "--save_images_steps", "100000",
                        "--shuffle_buffer_size", "16", *extra)  # fmt: skip
    return subprocess.Popen(launch_command(argv, num_processes), cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def _wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.05)


def _kill_family(proc, family=()):
    if proc.poll() is None:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True), *family]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


@pytest.mark.slow  # a launched streaming run: about 30 s
@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_folder_moved_away_mid_stream_ends_the_run_in_seconds_naming_it(tmp_path, num_processes):
    """With 2 processes both lose their part of the stream, each at another file: the main process says the first
    one's error, once."""
    folder = write_folder(tmp_path / "data", 64)
    proc = _launch(tmp_path, folder, num_processes=num_processes)
    try:
        _wait_for(tmp_path / "out" / "checkpoint-4", proc)
        os.rename(folder, tmp_path / "unmounted")  # as an unmounted share
        moved = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _kill_family(proc)
    took = time.monotonic() - moved
    log = (stdout + stderr).decode(errors="replace")
    assert proc.returncode != 0 and took < 60, (took, log[-3000:])
    stop = re.search(rf"error: cannot read {folder}/\d{{4}}\.png of the stream.* \(FileNotFoundError: .*not a corrupt "
                     "image. Restore the source, then continue from the last checkpoint with --resume_from_checkpoint "
                     r"latest \(saved (\S+) at step (\d+); resume with: (.*)\)$", log, re.MULTILINE)  # fmt: skip
    assert stop, log[-3000:]
    errors = re.findall("^error: .*", log, re.MULTILINE)
    assert len(set(errors)) == 1, "\n".join(errors)  # one line (accelerate launch repeats the trainer's stderr)
    assert log.count("skipped corrupt image") == 0 and len(log) < 200_000  # no flood of "corrupt" images
    assert (tmp_path / "out" / "checkpoint-4").is_dir()  # what was written before stays
    # what was trained is kept: the checkpoint of the last optimizer step, named in the line with its resume command
    saved, step, command = stop[1], int(stop[2]), stop[3]
    assert step >= 4 and saved == str(tmp_path / "out" / f"checkpoint-{step}") and os.path.isdir(saved), stop[0]
    assert json.loads((tmp_path / "out" / f"checkpoint-{step}" / "run_record.json").read_text())["step"] == step
    assert command.endswith("--resume_from_checkpoint latest") and "--streaming" in command, command
    assert not list((tmp_path / "out").glob(f"checkpoint-{step + 1}*")), "a checkpoint of a step not trained"


@pytest.mark.slow  # a launched streaming run: about 30 s
def test_sigkill_of_the_trainer_alone_ends_accelerate_launch_at_once_with_no_orphans(tmp_path):
    folder = write_folder(tmp_path / "data", 64)
    proc, family = _launch(tmp_path, folder), []
    try:
        _wait_for(tmp_path / "out" / "checkpoint-4", proc)
        (trainer,) = [p for p in psutil.Process(proc.pid).children() if "train.py" in " ".join(p.cmdline())]
        family = trainer.children(recursive=True)
        assert len(family) >= 2, [p.cmdline() for p in family]  # two decoding workers (and the resource tracker)
        trainer.send_signal(signal.SIGKILL)  # the OOM killer's way: the trainer alone
        killed = time.monotonic()
        proc.communicate(timeout=120)  # the launcher exits and no one holds its output pipes
        took = time.monotonic() - killed
        gone, alive = psutil.wait_procs(family, timeout=30)
    finally:
        _kill_family(proc, family)
    assert proc.returncode != 0 and took < 60, took
    assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
