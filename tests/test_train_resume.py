"""A resume must continue the same run: the checkpoint's run record (`run_record.json`, read by name) is compared with
the resumed run's before anything is read or written. Through the real command line (`accelerate launch
training/train.py`): a --streaming run, whose stream position is checkpointed beside the record, resumed with another
T, schedule or prediction type is refused naming each difference; an fp16 checkpoint resumed on a CPU is refused with
one error line; the unchanged resume continues to the weights of the uninterrupted run."""

import json
import shutil
import subprocess

import pytest
import torch
from hub_clients import tree_hashes
from training_runs import REPO, TIMEOUT, digit_shards, environment, launch, launch_command, launch_flags, weights

STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_steps", "1000", "--eval_size", "8"]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A finished 4-step --streaming run of the digits (checkpoints at steps 2 and 4) and its options."""
    tmp = tmp_path_factory.mktemp("streamed")
    stream = ["--streaming", "--train_data_files", ",".join(digit_shards(tmp / "digits")), "--shuffle_buffer_size",
              "16", *STEPS]  # fmt: skip
    out = tmp / "out"
    launch(launch_flags(out, *stream))
    return out, stream


def refused(argv) -> str:
    """Run the launch command (`accelerate launch --quiet`: our line is the last); return its one error line."""
    command = launch_command(argv)
    command = command[:3] + ["--quiet"] + command[3:]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


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
        "options it was trained with (see training_args.json), or start a new run"
    )
    assert tree_hashes(out) == before  # nothing read into it, nothing written


@pytest.mark.slow  # one more launch; the 2-process streaming resume is tests/test_data_streaming.py's (slow too)
def test_the_streaming_run_resumed_with_its_own_options_ends_with_the_same_weights(streamed, tmp_path):
    """From step 2, the stream's position and the record read back: the weights the uninterrupted run had at 4."""
    out, stream = streamed
    checkpoint = out / "checkpoint-4"
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoint-4")
    log = launch(launch_flags(copy, *stream, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {copy / 'checkpoint-2'} at optimizer step 2" in log
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
