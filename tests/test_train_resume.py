"""A resume must continue the same run: the checkpoint's run record (`run_record.json`, read by name) is compared with
the resumed run's before anything is read or written. Through the real command line (`accelerate launch
training/train.py`): a --streaming run, whose stream position is checkpointed beside the record, resumed with another
T, schedule or prediction type is refused naming each difference; an fp16 checkpoint resumed on a CPU is refused with
one error line; the unchanged resume continues to the weights of the uninterrupted run. The data is part of the
record: images added to a folder since the checkpoint are refused naming the change (the held-out split would move),
and go on only with --allow_data_change. A resume keeps the run's length and LR schedule (without --max_train_steps an
80-step run stays 80 steps), and its AdamW and EMA settings (the restored state holds them: a flag given is said, not
applied); an option that shapes the data (--eval_size, --max_train_samples, --streaming, ...) other than the run's is
named, not the data; two workers that accelerate makes separate 1-process runs are refused at once; a refused process
count names the newest checkpoint that fits, and the launch of the checkpoint's run, which resumes it as printed."""

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_clients import tree_hashes
from image_files import write_folder
from PIL import Image
from training_runs import (
    REPO,
    TIMEOUT,
    digit_shards,
    environment,
    free_port,
    launch,
    launch_command,
    launch_flags,
    reset_accelerate,
    weights,
)

from hf_ddpm.data import DataIdentity
from hf_ddpm.launch import resume_command
from hf_ddpm.training import checkpoints, main, parse_args, resume_checks
from hf_ddpm.training.checkpoints import Launch, RunRecord
from hf_ddpm.training.cli import build_parser
from hf_ddpm.training.output_dir import LOCK_NAME
from hf_ddpm.training.resolve import RunFacts, resolve

STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_steps", "1000", "--eval_size", "8"]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A 4-step --streaming run of the digits (checkpoints at steps 2 and 4) stopped in its final evaluation, and its
    options: its resume reads the data (a finished run's says it is complete before reading any)."""
    tmp = tmp_path_factory.mktemp("streamed")
    stream = ["--streaming", "--train_data_files", ",".join(digit_shards(tmp / "digits")), "--shuffle_buffer_size",
              "16", *STEPS]  # fmt: skip
    out = tmp / "out"
    launch(launch_flags(out, *stream))
    (out / "training_summary.json").unlink()
    return out, stream


def refused(argv, num_processes=1) -> str:
    """Run the launch command (`accelerate launch --quiet`: our line is the last of one process; with more, the
    launcher's report of the failed one follows); return its one error line."""
    command = launch_command(argv, num_processes)
    command = command[:3] + ["--quiet"] + command[3:]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    line = next(line for line in reversed(lines) if line.startswith("error: "))
    assert num_processes > 1 or line == lines[-1], lines[-5:]
    return line


def test_a_streaming_run_resumed_with_another_objective_is_refused_naming_each_difference(streamed):
    out, stream = streamed
    checkpoint = out / "checkpoint-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "run_record.json" in names and "custom_checkpoint_1.pkl" in names  # the EMA, then the stream's position
    assert json.loads((checkpoint / "run_record.json").read_text())["objective"]["num_train_timesteps"] == 50
    before = tree_hashes(out)
    changed = ["--ddpm_num_steps", "200", "--ddpm_beta_schedule", "squaredcos_cap_v2", "--prediction_type",
               "v_prediction", "--resume_from_checkpoint", "latest"]  # fmt: skip
    line = refused(launch_flags(out, *stream, *changed))
    assert line == (
        f"error: --resume_from_checkpoint {checkpoint} was trained with another model or objective: "
        "--ddpm_beta_schedule: 'linear' in the checkpoint, 'squaredcos_cap_v2' now; --ddpm_num_steps: 50 in the "
        "checkpoint, 200 now; --prediction_type: 'epsilon' in the checkpoint, 'v_prediction' now. Resume with the "
        f"options it was trained with (--config {out}/training_args.json holds them), or start a new run"
    )
    assert tree_hashes(out) == before  # nothing read into it, nothing written


def test_a_resume_without_the_runs_ema_choice_is_refused_naming_it_not_called_damage(streamed):
    """The checkpoint holds an EMA model (--use_ema) or none, the importance sampler's history or none: a resume that
    disagrees cannot load it, and the flag, not the intact files, is what to change."""
    out, stream = streamed
    checkpoint = out / "checkpoint-4"
    state = json.loads((checkpoint / "run_record.json").read_text())["state"]
    assert state == {"use_ema": True, "importance_sampling": False}
    before = tree_hashes(out)
    changed = ["--no-use_ema", "--importance_sampling", "--resume_from_checkpoint", "latest"]
    line = refused(launch_flags(out, *stream, *changed))
    assert line == (
        f"error: --resume_from_checkpoint {checkpoint} was trained with another model or objective: "
        "--importance_sampling: False in the checkpoint, True now; --use_ema: True in the checkpoint, False now. "
        f"Resume with the options it was trained with (--config {out}/training_args.json holds them), or start a new "
        "run"
    )
    assert tree_hashes(out) == before


def test_a_streaming_run_resumed_on_changed_files_is_refused_naming_the_change(streamed):
    """A stream of local files is keyed by their paths, sizes and modification times, as a cached source is."""
    out, stream = streamed
    record = json.loads((out / "checkpoint-4" / "run_record.json").read_text())
    shard = Path(stream[stream.index("--train_data_files") + 1].split(",")[0])
    before, stat = tree_hashes(out), shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten since the checkpoint
    try:
        line = refused(launch_flags(out, *stream, "--resume_from_checkpoint", "latest"))
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert f"changed since checkpoint-4 (its key {record['data']['source']} is now " in line, line
    assert "--allow_data_change" in line
    assert drop_lock(tree_hashes(out)) == drop_lock(before)


@pytest.mark.slow  # one more launch; the 2-process streaming resume is tests/test_data_streaming.py's (slow too)
def test_the_streaming_run_resumed_with_its_own_options_ends_with_the_same_weights(streamed, tmp_path):
    """From step 2, the stream's position and the record read back: the weights the uninterrupted run had at 4."""
    out, stream = streamed
    checkpoint = out / "checkpoint-4"
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    log = launch(launch_flags(copy, *stream, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {copy / 'checkpoint-2'} at optimizer step 2" in log
    assert "an unknown number of training images" in log  # a stream that states no length (not "0")
    a, b = weights(checkpoint / "model.safetensors"), weights(copy / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_an_fp16_checkpoint_resumed_on_a_cpu_is_refused_with_one_line(streamed, tmp_path):
    """The run record says what the checkpoint was trained with (here edited to fp16, as a GPU run writes it); the
    resumed run takes that precision, and the CPU check refuses it before accelerate is asked for it."""
    out, stream = streamed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    path = copy / "checkpoint-4" / "run_record.json"
    record = json.loads(path.read_text())
    assert record["launch"]["mixed_precision"] == "no"
    record["launch"]["mixed_precision"] = "fp16"
    path.write_text(json.dumps(record))
    before = tree_hashes(copy)
    line = refused(launch_flags(copy, *stream, "--resume_from_checkpoint", "latest"))
    assert line == (
        f"error: the checkpoint {copy / 'checkpoint-4'} was trained with --mixed_precision fp16, which needs a CUDA "
        "GPU, and none is available: resume it on a machine with one, or start a new run"
    )
    assert tree_hashes(copy) == before


# ------------------------------------------------------------------------------------------------ the data's identity


def write_digits(folder, start: int, count: int) -> None:
    """Bundled digits start..start+count-1 as 8x8 grayscale PNGs named by their index."""
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[start : start + count] * (255 / 16)).round().astype(np.uint8)
    write_folder(folder, {f"{start + i:04d}.png": Image.fromarray(p, mode="L") for i, p in enumerate(pixels)})


@contextlib.contextmanager
def added_images(folder, count: int = 20):
    """`count` more digits in `folder` for the block; removed after it (the other files are never touched, so the
    folder's key is the checkpoint's again)."""
    write_digits(folder, 1000, count)
    try:
        yield
    finally:
        for i in range(count):
            (folder / f"{1000 + i:04d}.png").unlink()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 4-step run on a folder of 60 digits (16 held out; checkpoints at steps 2 and 4) stopped in its final
    evaluation, so that its resume reads the data; the folder and the run's options without its length."""
    tmp = tmp_path_factory.mktemp("folder")
    write_digits(tmp / "images", 0, 60)
    data = ["--train_data_dir", str(tmp / "images"), "--cache_dir", str(tmp / "cache"), "--checkpointing_steps", "2",
            "--save_images_steps", "1000"]  # fmt: skip
    out = tmp / "out"
    launch(launch_flags(out, *data, "--max_train_steps", "4"))
    (out / "training_summary.json").unlink()
    return tmp / "images", out, data


def test_images_added_to_the_folder_since_the_checkpoint_are_refused_naming_the_change(folder_run):
    images, out, data = folder_run
    record = json.loads((out / "checkpoint-4" / "run_record.json").read_text())
    assert record["data"]["num_images"] == 44 and record["data"]["num_held_out"] == 16
    assert len(record["data"]["source"]) == 24  # the preprocessed cache's key
    assert record["launch"] == {"num_processes": 1, "mixed_precision": "no", "accelerate": True, "cpu": True}
    assert record["schedule"]["total_steps"] == 4 and record["schedule"]["max_train_steps"] == 4
    before, cache = tree_hashes(out), sorted((images.parent / "cache").rglob("*"))
    with added_images(images):
        line = refused(launch_flags(out, *data, "--resume_from_checkpoint", "latest"))
    # refused before a cache of the new data is built (at a million images: hours of decoding and GBs of disk)
    assert sorted((images.parent / "cache").rglob("*")) == cache
    assert line.startswith(
        f"error: 20 images added to {images} since checkpoint-4 (its key {record['data']['source']} "
    )
    assert line.endswith(
        "differs): the held-out split would change (other images). Restore the data to resume this run, or pass "
        "--allow_data_change to go on with the data as it is now (the held-out split is then drawn again from it: "
        "it may hold images the model trained on, and held-out bits/dim before and after step 4 do not compare)"
    )
    # nothing written but the lock's holder: the data is read (and so compared) by a run that holds the lock
    assert drop_lock(tree_hashes(out)) == drop_lock(before)


@pytest.mark.slow  # two 2-process launches
def test_a_two_process_resume_on_changed_data_ends_with_the_main_process_line_alone(tmp_path):
    """The machine's main process refuses before building the new cache; the other hears of it at once (no barrier
    left waiting for the launcher) and holds its own line back: one error line, and no cache of the new data."""
    write_digits(tmp_path / "images", 0, 60)
    data = ["--train_data_dir", str(tmp_path / "images"), "--cache_dir", str(tmp_path / "cache"),
            "--checkpointing_steps", "2", "--save_images_steps", "1000", "--max_train_steps", "2"]  # fmt: skip
    out = tmp_path / "out"
    launch(launch_flags(out, *data), num_processes=2)
    (out / "training_summary.json").unlink()  # stopped in its final evaluation: a finished run is complete instead
    cache = sorted((tmp_path / "cache").rglob("*"))
    write_digits(tmp_path / "images", 1000, 20)
    line = refused(launch_flags(out, *data, "--resume_from_checkpoint", "latest"), num_processes=2)
    assert line.startswith(f"error: 20 images added to {tmp_path / 'images'} since checkpoint-2 (its key ")
    assert sorted((tmp_path / "cache").rglob("*")) == cache


def test_before_decoding_the_data_change_says_only_what_its_key_and_rows_tell():
    """`load_data`'s `before_build` knows the training split's key and rows, not its pixels: the held-out split is
    said to move only when it is drawn from a split whose rows changed."""
    saved = DataIdentity("k1", num_images=44, num_held_out=16, held_out="ab", description="imgs", num_rows=60)
    grown, rewritten = DataIdentity("k2", description="imgs", num_rows=80), DataIdentity("k2", num_rows=60)
    key = " (its key k1 is now k2: a file's path, size or modification time, or a preprocessing option, differs)"
    assert grown.change_since(saved, "checkpoint-4", True) == (
        f"20 images added to imgs since checkpoint-4{key}: the held-out split would change (other images)"
    )
    assert grown.change_since(saved, "checkpoint-4", False) == (  # the source's own held-out split: unknown yet
        f"20 images added to imgs since checkpoint-4{key}: nothing of it is decoded yet, and the held-out split may "
        "change too"
    )
    assert rewritten.change_since(saved, "checkpoint-4", True) == (
        f"imgs changed since checkpoint-4{key}: nothing of it is decoded yet, and the held-out split may change too"
    )
    assert DataIdentity("k1", num_rows=80).change_since(saved, "checkpoint-4", True) is None  # its cache exists
    shrunk = DataIdentity("k2", description="imgs", num_rows=59)
    assert shrunk.change_since(saved, "checkpoint-4", True).startswith("1 image removed from imgs since checkpoint-4")
    # a record written before the rows were recorded: the count is not guessed from the decoded images
    old = DataIdentity("k1", num_images=44, num_held_out=16, held_out="ab", description="imgs")
    assert grown.change_since(old, "checkpoint-4", True).startswith("imgs changed since checkpoint-4 (its key k1")


def test_a_resume_that_would_end_before_the_pipeline_in_the_output_directory_is_refused(folder_run, tmp_path):
    """A run extended past its last checkpoint (here: its summary says step 6, its newest checkpoint is step 4), then
    resumed as it was, would end at step 4 and replace the step-6 pipeline with older weights."""
    images, out, data = folder_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "training_summary.json").write_text(json.dumps({"optimizer_steps": 6}))  # of the pipeline of step 6
    before = tree_hashes(copy)
    line = refused(launch_flags(copy, *data, "--resume_from_checkpoint", "latest"))
    assert line == (
        f"error: {copy} holds the pipeline of step 6 and this resume of checkpoint-4 ends at step 4: its pipeline "
        "would replace those weights with older ones. Keep the pipeline (step 6 has no checkpoint), or train on past "
        "step 6 (--max_train_steps with --allow_schedule_change)"
    )
    assert drop_lock(tree_hashes(copy)) == drop_lock(before)


def test_a_resume_with_another_seed_is_refused_naming_the_seed_not_the_data(folder_run):
    """The held-out split is drawn with the seed: a resume that leaves out the run's --seed (or gives another) moves
    it, and the way out is the seed, not restoring data that never changed."""
    images, out, data = folder_run
    before = tree_hashes(out)
    line = refused(launch_flags(out, *data, "--resume_from_checkpoint", "latest", "--seed", "5"))
    assert line == (
        "error: --seed 5 is not the run's --seed 0 (checkpoint-4): its held-out split and any random crops are drawn "
        "with the seed, and would change. Resume with --seed 0, or pass --allow_data_change to go on with the data as "
        "it is now (the held-out split is then drawn again from it: it may hold images the model trained on, and "
        "held-out bits/dim before and after step 4 do not compare)"
    )
    assert drop_lock(tree_hashes(out)) == drop_lock(before)


@pytest.mark.parametrize(
    "flags,said,way",
    [
        (["--eval_size", "12"], "--eval_size 12 is not the run's --eval_size 16", "Resume with --eval_size 16"),
        (["--max_train_samples", "20"], "--max_train_samples 20 is not the run's (it gave no --max_train_samples)",
         "Resume without --max_train_samples"),
    ],
)  # fmt: skip
def test_a_resume_with_a_data_option_not_the_runs_is_refused_naming_the_option_not_the_data(folder_run, flags, said,
                                                                                            way):  # fmt: skip
    """The held-out split's size and the training subset are options: the data never changed, and restoring it is no
    way out; the option and its two values are named, and the way out is the run's value (or a new run). A subset is
    another cache key: refused before that cache is built."""
    images, out, data = folder_run
    before, cache = tree_hashes(out), sorted((images.parent / "cache").rglob("*"))
    line = refused(launch_flags(out, *data, "--resume_from_checkpoint", "latest", *flags))
    assert line == (
        f"error: {said} (checkpoint-4): the images the run trains on and holds out follow from it, and would change. "
        f"{way}, or start a new run, or pass --allow_data_change to go on with the data as it is now (the held-out "
        "split is then drawn again from it: it may hold images the model trained on, and held-out bits/dim before and "
        "after step 4 do not compare)"
    )
    assert drop_lock(tree_hashes(out)) == drop_lock(before)
    assert sorted((images.parent / "cache").rglob("*")) == cache


def test_a_streaming_run_resumed_without_streaming_is_refused_naming_the_flag(streamed, tmp_path):
    """Its data is read as a stream and keyed as one: a resume that reads it into the cache instead finds another
    key. The flag is named (before the cache is built), not a change of the files."""
    out, stream = streamed
    record = json.loads((out / "checkpoint-4" / "run_record.json").read_text())
    assert record["options"]["streaming"] is True and record["options"]["train_data_files"] == ",".join(
        stream[stream.index("--train_data_files") + 1].split(",")
    )
    before, cache = tree_hashes(out), tmp_path / "cache"
    cached = [arg for arg in stream if arg != "--streaming"] + ["--cache_dir", str(cache)]
    line = refused(launch_flags(out, *cached, "--resume_from_checkpoint", "latest"))
    assert line.startswith(
        "error: --no-streaming (the default) is not the run's --streaming (checkpoint-4): the images the run trains "
        "on and holds out follow from it, and would change. Resume with --streaming, or start a new run, or pass "
        "--allow_data_change "
    ), line
    assert not (cache / "hf_ddpm_preprocessed").exists()  # refused before the files' images were decoded
    assert drop_lock(tree_hashes(out)) == drop_lock(before)


def test_the_refusal_names_each_data_option_and_its_way_out_and_a_real_change_keeps_its_words():
    """In process: options given, left out or of a run that gave none are each named with both values; with them
    the run's, a change of the data itself is named as before."""
    flags = ["--eval_size", "16", "--random_crop", "--max_train_samples", "40"]
    run = RunRecord.of_run(0, {}, dict.fromkeys(checkpoints.OBJECTIVE_KEYS), parse_args(flags), 1)
    saved = replace(run, step=4, data=DataIdentity("k1", 40, 16, "ab", "imgs"))
    moved = DataIdentity("k2", 40, 12, "cd", "imgs")

    def refusal(*given):
        with pytest.raises(ValueError) as refused_:
            resume_checks.check_data(
                "out/checkpoint-4", saved, moved, False, resume_checks.data_options(parse_args(given))
            )
        return str(refused_.value).split(", or pass --allow_data_change")[0]

    assert refusal("--eval_size", "12", "--max_train_samples", "40", "--seed", "1") == (
        "--seed 1 is not the run's --seed 0; --center_crop (the default) is not the run's --random_crop; --eval_size "
        "12 is not the run's --eval_size 16 (checkpoint-4): the images the run trains on and holds out follow from "
        "them, and would change. Resume with --random_crop --eval_size 16 and without --seed, or start a new run"
    )
    assert refusal("--eval_size", "16", "--random_crop") == (
        "the run's --max_train_samples 40 is left out (checkpoint-4): the images the run trains on and holds out "
        "follow from it, and would change. Resume with --max_train_samples 40, or start a new run"
    )
    assert refusal(*flags) == (  # the run's options: the data itself changed
        "4 images removed from imgs since checkpoint-4 (its key k1 is now k2: a file's path, size or modification "
        "time, or a preprocessing option, differs): the held-out split would change (16 -> 12 images). Restore the "
        "data to resume this run"
    )
    older = replace(saved, options={})  # a record of an earlier version: the data is named, as it was
    with pytest.raises(ValueError, match=r"^4 images removed from imgs since checkpoint-4 "):
        resume_checks.check_data("out/checkpoint-4", older, moved, False, resume_checks.data_options(parse_args([])))
    resume_checks.check_data("out/checkpoint-4", saved, saved.data, False, {})  # the same data: nothing to name


def drop_lock(hashes: dict) -> dict:
    return {name: digest for name, digest in hashes.items() if name != LOCK_NAME}


@pytest.mark.slow  # one more launch
def test_allow_data_change_resumes_on_the_data_as_it_is_now_and_says_so(folder_run, tmp_path):
    images, out, data = folder_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    with added_images(images):
        log = launch(launch_flags(copy, *data, "--resume_from_checkpoint", "latest", "--allow_data_change"))
    assert "--allow_data_change: 20 images added to" in log and "the held-out split is drawn again" in log
    assert f"resumed from {copy / 'checkpoint-2'} at optimizer step 2" in log
    record = json.loads((copy / "checkpoint-4" / "run_record.json").read_text())
    assert record["data"]["num_images"] == 64 and record["step"] == 4  # 80 images, 16 held out; the length kept


@pytest.mark.slow  # one more launch; test_a_resume_keeps_the_recorded_length_... checks the same rule in process
def test_a_resume_without_max_train_steps_keeps_the_runs_length_and_ends_as_the_run_would(folder_run, tmp_path):
    """The launched run was 4 steps long; its options without --max_train_steps would train --num_epochs 40 (440
    steps) on a new LR schedule. Resumed from step 2, it ends at step 4 with the uninterrupted run's weights."""
    _, out, data = folder_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    log = launch(launch_flags(copy, *data, "--resume_from_checkpoint", "latest"))
    assert f"--max_train_steps 4: the resumed run's (from {copy / 'checkpoint-2'})" in log
    assert [step for step, _ in checkpoints.list_checkpoints(copy)] == [2, 4]
    assert json.loads((copy / "training_summary.json").read_text())["optimizer_steps"] == 4
    assert json.loads((copy / "training_args.json").read_text())["max_train_steps"] == 4
    a, b = weights(out / "checkpoint-4" / "model.safetensors"), weights(copy / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three launches; test_a_resume_left_without_the_schedule_flags_... checks the same rule in process
def test_a_resume_command_without_the_runs_schedule_flags_resumes_it_to_the_uninterrupted_weights(tmp_path):
    """A run given --num_epochs, --lr_scheduler and --learning_rate, resumed with none of them: the run's own are
    kept (no default reads as a change to refuse), and it ends with the uninterrupted run's weights; so does a resume
    with nothing but the run's training_args.json (`--config`, the way out a refused resume names)."""
    write_digits(tmp_path / "images", 0, 24)  # 8 training images at batch 4: 2 steps an epoch
    data = ["--train_data_dir", str(tmp_path / "images"), "--cache_dir", str(tmp_path / "cache"),
            "--checkpointing_steps", "2", "--save_images_steps", "1000"]  # fmt: skip
    schedule = ["--num_epochs", "2", "--lr_scheduler", "linear", "--learning_rate", "1e-3"]
    out, copy = tmp_path / "out", tmp_path / "copy"
    launch(launch_flags(out, *data, *schedule))
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    log = launch(launch_flags(copy, *data, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {copy / 'checkpoint-2'} at optimizer step 2" in log and "not applied" not in log
    args = json.loads((copy / "training_args.json").read_text())
    assert (args["num_epochs"], args["lr_scheduler"], args["learning_rate"], args["max_train_steps"]) == (
        2, "linear", 1e-3, 4)  # fmt: skip
    a, b = weights(out / "checkpoint-4" / "model.safetensors"), weights(copy / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The refusal's way out, followed: the run's training_args.json holds every option it was trained with.
    again = tmp_path / "again"
    shutil.copytree(copy, again)
    shutil.rmtree(again / "checkpoint-4")
    (again / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    argv = [
        "--config",
        str(copy / "training_args.json"),
        "--output_dir",
        str(again),
        "--resume_from_checkpoint",
        "latest",
    ]
    assert f"resumed from {again / 'checkpoint-2'} at optimizer step 2" in launch(argv)
    c = weights(again / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_the_help_says_what_the_datas_key_sees():
    text = " ".join(build_parser().format_help().split())
    assert "sizes and modification times, not their contents" in text and "--allow_data_change" in text


# ------------------------------------------------------------------------------------------------ the launch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs: --multi_gpu needs the CPU asked for")
def test_a_worker_of_several_that_accelerate_makes_a_1_process_run_is_refused(monkeypatch, fresh_accelerate_state):
    """What each worker of the launch below sees, in process: WORLD_SIZE=2 from the launcher, no CPU asked for."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main.launch_processes() == 1  # a run alone
    reset_accelerate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^2 workers were started \(WORLD_SIZE=2\) but accelerate made each a sep"):
        main.launch_processes()


@pytest.mark.slow  # two interpreters and torchrun (~40 s on a loaded machine); the rule is checked in process above
@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs: --multi_gpu needs the CPU asked for")
def test_two_workers_that_accelerate_makes_separate_runs_are_refused_at_once(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU without ACCELERATE_USE_CPU=1: torchrun starts two
    workers (WORLD_SIZE=2) that accelerate would each make a 1-process run. Refused before anything is written."""
    out = tmp_path / "out"
    env = environment()
    del env["ACCELERATE_USE_CPU"]
    started = time.monotonic()
    result = subprocess.run(launch_command(launch_flags(out, "--max_train_steps", "2"), num_processes=2), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        "error: 2 workers were started (WORLD_SIZE=2) but accelerate made each a separate 1-process run: no GPU is "
        "used and the CPU was not asked for. On a CPU, launch with `ACCELERATE_USE_CPU=1 accelerate launch "
        "--multi_gpu --num_processes 2 ...`"
    ) in result.stderr
    assert "in use by another training run" not in result.stderr and not out.exists()
    assert time.monotonic() - started < 120  # two interpreters' start-up on a loaded machine; no training


def record(step: int, num_processes: int) -> RunRecord:
    return RunRecord(step, {"sample_size": 8}, {"loss": "simple"}, Launch(num_processes, "no"), {})


def test_a_refused_process_count_names_the_newest_checkpoint_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["training/train.py", "--output_dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    for step, processes in ((90, 2), (96, 2), (99, 1)):  # a 2-process run, then a 1-process resume of it
        (out / f"checkpoint-{step}").mkdir(parents=True)
        record(step, processes).write(str(out / f"checkpoint-{step}"))
    latest = checkpoints.resolve_resume("latest", str(out))
    with pytest.raises(ValueError) as refusal:
        resume_checks.check_resume(latest, RunRecord.read(latest), record(0, 2))
    assert str(refusal.value) == (
        "checkpoint-99 was written by 1 process and this run has 2 (the data order and random streams depend on it): "
        f"checkpoint-96 fits this 2-process run: --resume_from_checkpoint {out / 'checkpoint-96'}; or resume "
        f"checkpoint-99 with `python training/train.py --output_dir {out} --resume_from_checkpoint {latest}`, or "
        "start a new run"  # launched as the record says checkpoint-99's run was: by `python`, on 1 process
    )
    with pytest.raises(ValueError) as refusal:
        resume_checks.check_resume(str(out / "checkpoint-96"), record(96, 2), record(0, 3))  # none fits
    assert str(refusal.value).startswith("checkpoint-96 was written by 2 processes and this run has 3 ")
    assert str(refusal.value).endswith(
        f": resume it with `accelerate launch --multi_gpu --num_processes 2 --mixed_precision no training/train.py "
        f"--output_dir {out} --resume_from_checkpoint {out / 'checkpoint-96'}`, or start a new run"
    )


@pytest.mark.slow  # a 2-process run, its refused resume by `python`, and the printed command followed
def test_a_refused_process_count_prints_the_launch_of_the_checkpoints_run_and_following_it_resumes(tmp_path):
    """A 2-process DDP checkpoint on a CPU resumed by `python training/train.py`: the way out is the command that
    launches the run as its record says it was (`ACCELERATE_USE_CPU=1`, `--multi_gpu`: a bare `accelerate launch
    --num_processes 2` starts one process here, and is refused the same way). Run as printed, it resumes."""
    out = tmp_path / "out"
    flags = launch_flags(out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--save_images_steps", "1000")
    launch(flags, num_processes=2)
    (out / "training_summary.json").unlink()  # stopped in its final evaluation: its resume evaluates and saves
    before = tree_hashes(out)
    resume = [sys.executable, "training/train.py", *flags, "--resume_from_checkpoint", "latest"]
    result = subprocess.run(resume, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1, result.stderr[-3000:]
    command = (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --mixed_precision no training/train.py "
        + shlex.join([*flags, "--resume_from_checkpoint", str(out / "checkpoint-2")])
    )
    assert result.stderr.strip().splitlines()[-1] == (
        "error: checkpoint-2 was written by 2 processes and this run has 1 (the data order and random streams depend "
        f"on it): resume it with `{command}`, or start a new run"
    )
    assert drop_lock(tree_hashes(out)) == drop_lock(before)
    # Followed as printed (on a free port: tests run side by side), in an environment that does not ask for the CPU.
    env = environment()
    del env["ACCELERATE_USE_CPU"]
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # the venv's `accelerate`
    followed = command.replace("accelerate launch ", f"accelerate launch --main_process_port {free_port()} ", 1)
    result = subprocess.run(followed, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-2'} at optimizer step 2" in result.stdout + result.stderr
    assert json.loads((out / "training_summary.json").read_text())["optimizer_steps"] == 2


def test_the_resume_command_reproduces_the_launch(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["training/train.py"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    argv = ["--seed", "3", "--allow_data_change", "--allow-schedule-change", "--resume-from-checkpoint=checkpoint-4"]
    assert resume_command(argv, 2, "bf16", cpu=True) == (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 "
        "training/train.py --seed 3 --resume_from_checkpoint latest"
    )
    assert resume_command(argv, 1, "no", cpu=True) == (
        "ACCELERATE_USE_CPU=1 python training/train.py --seed 3 --resume_from_checkpoint latest"
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # started by `accelerate launch`
    assert resume_command(argv, 1, "no", cpu=True) == (
        "accelerate launch --cpu --num_processes 1 --mixed_precision no training/train.py --seed 3 "
        "--resume_from_checkpoint latest"
    )
    assert resume_command(argv, 2, "no", cpu=False).startswith("accelerate launch --multi_gpu --num_processes 2 ")


# ------------------------------------------------------------------------------------------------ length and schedule

SCHEDULE = {"max_train_steps": 80, "num_epochs": 40, "lr_scheduler": "cosine", "lr_warmup_steps": 8,
            "learning_rate": 2e-3, "total_steps": 80}  # fmt: skip


def resolved(*flags, schedule=SCHEDULE):
    facts = RunFacts(resume_path="out/checkpoint-40", resumed_schedule=schedule, train_images=1600)
    return resolve(parse_args(["--resume_from_checkpoint", "latest", *flags]), facts)


def test_a_resume_keeps_the_recorded_length_and_warmup_and_refuses_a_change_naming_it():
    config, notes = resolved()
    assert (config.max_train_steps, config.lr_warmup_steps) == (80, 8)
    assert "--max_train_steps 80: the resumed run's (from out/checkpoint-40)" in notes
    epochs = {**SCHEDULE, "max_train_steps": None}  # an --num_epochs run: 80 steps recorded, kept alike
    assert resolved(schedule=epochs)[0].max_train_steps == 80
    with pytest.raises(ValueError) as refusal:
        resolved("--max_train_steps", "480", "--lr_scheduler", "linear")
    assert str(refusal.value) == (
        "the run of out/checkpoint-40 is 80 optimizer steps long on its LR schedule, and a resume keeps both: "
        "--max_train_steps 480 (the run's length: 80 optimizer steps); --lr_scheduler linear (the run's: cosine). "
        "Drop the flag to finish the run as it began, or pass --allow_schedule_change to train on with it (the LR "
        "schedule is then recomputed over the new length)"
    )
    with pytest.raises(ValueError, match=r"--num_epochs 80 \(the run's: 40, 80 optimizer steps\)"):
        resolved("--num_epochs", "80", schedule=epochs)
    longer, notes = resolved("--max_train_steps", "480", "--allow_schedule_change")
    assert longer.max_train_steps == 480 and any(
        "the LR schedule is recomputed over the new length" in n for n in notes
    )
    by_epochs, _ = resolved("--num_epochs", "80", "--allow_schedule_change", schedule=epochs)
    assert by_epochs.max_train_steps is None and by_epochs.num_epochs == 80  # the length from the epochs again
    assert resolve(parse_args(["--resume_from_checkpoint", "latest"]), RunFacts())[0].max_train_steps is None  # fresh
    _, notes = resolved("--learning_rate", "1e-4")  # the restored optimizer and LambdaLR hold the run's peak
    assert (
        "--learning_rate 0.0001 is not applied: the resumed optimizer and LR schedule restore the run's peak "
        "learning rate, 0.002" in notes
    )


def test_a_resume_left_without_the_schedule_flags_keeps_the_runs_and_a_new_run_takes_the_defaults():
    """The options a checkpoint records default to None: a resume reads a flag left out as "the run's", never as a
    default that differs from it (which would refuse the plain `--resume_from_checkpoint latest`, asking to drop a
    flag never given, or say a learning rate was not applied)."""
    own = {"max_train_steps": None, "num_epochs": 5, "lr_scheduler": "linear", "lr_warmup_steps": 8,
           "learning_rate": 1e-4, "total_steps": 125}  # fmt: skip
    config, notes = resolved(schedule=own)
    assert (config.num_epochs, config.lr_scheduler, config.learning_rate, config.lr_warmup_steps) == (
        5, "linear", 1e-4, 8)  # fmt: skip
    assert config.max_train_steps == 125 and not any("learning_rate" in n for n in notes)
    assert "--lr_scheduler linear: the resumed run's (from out/checkpoint-40)" in notes
    with pytest.raises(ValueError, match=r"--lr_scheduler cosine \(the run's: linear\)\. Drop the flag"):
        resolved("--lr_scheduler", "cosine", schedule=own)  # given, it is a change
    with pytest.raises(ValueError, match=r"--num_epochs 40 \(the run's: 5, 125 optimizer steps\)"):
        resolved("--num_epochs", "40", schedule=own)
    fresh, _ = resolve(parse_args([]), RunFacts())
    assert (fresh.num_epochs, fresh.lr_scheduler, fresh.learning_rate) == (40, "cosine", 2e-3)


def test_a_resume_keeps_the_runs_adamw_and_ema_settings_and_says_a_flag_given_is_not_applied():
    """The restored optimizer and EMA hold them: the resolved config (training_args.json) takes the run's from its
    record, as the learning rate, and each flag given that differs is said not to be applied, a flag at a new run's
    default too; a record written before it held them leaves the flags as given, and a new run's defaults."""
    run = {"adam_beta1": 0.9, "adam_beta2": 0.99, "adam_weight_decay": 0.0, "adam_epsilon": 1e-6,
           "ema_max_decay": 0.999, "ema_inv_gamma": 2.0, "ema_power": 0.5, "eval_size": 16}  # fmt: skip
    facts = RunFacts(resume_path="out/checkpoint-40", resumed_schedule=SCHEDULE, resumed_options=run)
    given = ["--resume_from_checkpoint", "latest", "--adam_beta1", "0.5", "--adam_weight_decay", "0.3",
             "--ema_max_decay", "0.5", "--ema_power", "0.75", "--adam_epsilon", "1e-6"]  # fmt: skip
    config, notes = resolve(parse_args(given), facts)
    assert {k: getattr(config, k) for k in run} == {**run, "eval_size": 0.1}  # the data's options are not taken
    assert [n for n in notes if "not applied" in n] == [
        "--adam_beta1 0.5 is not applied: the resumed optimizer restores the run's --adam_beta1 0.9",
        "--adam_weight_decay 0.3 is not applied: the resumed optimizer restores the run's --adam_weight_decay 0.0",
        "--ema_max_decay 0.5 is not applied: the resumed EMA restores the run's --ema_max_decay 0.999",
        "--ema_power 0.75 is not applied: the resumed EMA restores the run's --ema_power 0.5",
    ]  # --ema_power 0.75 is a new run's default, given; --adam_epsilon 1e-6 the run's
    assert resolve(config, facts)[0] == config  # resolved once: it resolves to itself
    older = resolve(parse_args(given), replace(facts, resumed_options={}))[0]  # a record without them
    assert (older.adam_beta1, older.adam_weight_decay, older.ema_max_decay) == (0.5, 0.3, 0.5)
    assert (older.adam_beta2, older.ema_inv_gamma) == (0.999, 1.0)  # not given: a new run's
    fresh = resolve(parse_args(["--adam_beta1", "0.5"]), RunFacts())[0]
    assert (fresh.adam_beta1, fresh.adam_beta2) == (0.5, 0.999)


@pytest.mark.slow  # one more launch
def test_adamw_and_ema_flags_given_to_a_resume_are_not_applied_and_training_args_json_holds_what_trains(
    folder_run, tmp_path
):
    """Resumed with other betas, weight decay and EMA decay, the run trains with its own (the restored state's):
    the log says each flag is not applied, training_args.json and the new checkpoint's state hold the run's values,
    and the weights are the uninterrupted run's."""
    _, out, data = folder_run
    record = json.loads((out / "checkpoint-2" / "run_record.json").read_text())
    assert {k: record["options"][k] for k in ("adam_beta1", "adam_weight_decay", "ema_max_decay")} == {
        "adam_beta1": 0.95, "adam_weight_decay": 1e-6, "ema_max_decay": 0.9999}  # fmt: skip
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "training_summary.json").unlink(missing_ok=True)  # stopped after step 2: it never finished
    changed = ["--adam_beta1", "0.5", "--adam_weight_decay", "0.3", "--ema_max_decay", "0.5"]
    log = launch(launch_flags(copy, *data, "--resume_from_checkpoint", "latest", *changed))
    assert "--adam_beta1 0.5 is not applied: the resumed optimizer restores the run's --adam_beta1 0.95" in log
    assert (
        "--adam_weight_decay 0.3 is not applied: the resumed optimizer restores the run's --adam_weight_decay 1e-06"
        in log
    )
    assert "--ema_max_decay 0.5 is not applied: the resumed EMA restores the run's --ema_max_decay 0.9999" in log
    args = json.loads((copy / "training_args.json").read_text())
    assert (args["adam_beta1"], args["adam_beta2"], args["adam_weight_decay"], args["ema_max_decay"]) == (
        0.95, 0.999, 1e-6, 0.9999)  # fmt: skip
    (group,) = torch.load(copy / "checkpoint-4" / "optimizer.bin", weights_only=True)["param_groups"]
    assert (tuple(group["betas"]), group["weight_decay"]) == ((0.95, 0.999), 1e-6)
    ema = torch.load(copy / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=True)
    assert ema["decay"] == 0.9999
    assert json.loads((copy / "checkpoint-4" / "run_record.json").read_text())["options"]["adam_beta1"] == 0.95
    a, b = weights(out / "checkpoint-4" / "model.safetensors"), weights(copy / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
