"""How a run stops when it cannot go on, through `hf_ddpm.training.main.main` (the code behind training/train.py):
a streaming source that vanishes mid-step stops it with a checkpoint of the last whole optimizer step (the unfinished
step is dropped, so the resume ends with the weights of an uninterrupted run) and one error line with the resume
command; a signal during the final evaluation writes the checkpoint of the last step, whose resume only evaluates
and saves; a signal during the pipeline's save lets the save finish and says so. In process, with real signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from training_runs import (
    REPO,
    assert_same_weights,
    digit_shards,
    environment,
    launch_command,
    launch_flags,
    reset_accelerate,
    tiny,
)

import hf_ddpm.training.loop as loop
from hf_ddpm.data import StreamSourceError
from hf_ddpm.data.streaming import StreamingBatches
from hf_ddpm.training.checkpoints import RUN_RECORD
from hf_ddpm.training.interruptions import SOURCE_LOST_STATUS
from hf_ddpm.training.main import main

PIPELINE = "unet/diffusion_pytorch_model.safetensors"


def run(argv) -> int:
    """main() as training/train.py calls it (the printed resume command repeats sys.argv)."""
    argv = [str(a) for a in argv]
    reset_accelerate()
    saved, sys.argv = sys.argv, ["training/train.py", *argv]
    try:
        return main(argv)
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ",".join(digit_shards(tmp_path_factory.mktemp("digits"), count=64))


def streaming(out, shards, *extra):
    return tiny(out, "--streaming", "--train_data_files", shards, "--shuffle_buffer_size", "8",
                "--gradient_accumulation_steps", "2", "--max_train_steps", "4", "--checkpointing_steps", "100",
                "--save_images_steps", "100", *extra)  # fmt: skip


def test_a_source_lost_mid_step_checkpoints_the_last_step_and_resumes_to_the_uninterrupted_weights(
    tmp_path, shards, monkeypatch, capsys
):
    assert run(streaming(tmp_path / "reference", shards)) == 0  # uninterrupted
    out = tmp_path / "out"
    batch = StreamingBatches.batch

    def vanishing(self, micro_step):  # the second micro-step of optimizer step 3 finds the source gone
        if micro_step == 5:
            raise StreamSourceError(f"cannot read 0042.png of the stream {shards}: gone. Restore the source", shards)
        return batch(self, micro_step)

    monkeypatch.setattr(StreamingBatches, "batch", vanishing)
    capsys.readouterr()
    assert run(streaming(out, shards)) == SOURCE_LOST_STATUS
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch(rf"error: cannot read 0042.png of the stream {re.escape(shards)}: gone. Restore the source "
                        rf"\(saved {re.escape(str(out))}/checkpoint-2 at step 2; resume with: .*--streaming .*"
                        r"--resume_from_checkpoint latest\)", lines[0]), lines[0]  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the step that was trained
    assert json.loads((out / "checkpoint-2" / "run_record.json").read_text())["step"] == 2
    assert not (out / PIPELINE).exists()

    monkeypatch.setattr(StreamingBatches, "batch", batch)  # the source is back
    assert run(streaming(out, shards, "--resume_from_checkpoint", "latest")) == 0
    # step 3's first micro-step, trained before the stop, was dropped and read again on resume: the same weights
    assert_same_weights(tmp_path / "reference", out)


def signal_in(monkeypatch, name):
    """Send this process SIGTERM as loop.`name` starts, then let it run."""
    original = getattr(loop, name)

    def send_then_run(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, name, send_then_run)


def test_a_signal_during_the_final_evaluation_checkpoints_the_last_step_whose_resume_evaluates_and_saves(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = tiny(out, "--max_train_steps", "3", "--checkpointing_steps", "2")
    signal_in(monkeypatch, "_log_bits_per_dim")
    evaluate = loop._log_bits_per_dim  # 3 s of evaluation before the signal comes
    monkeypatch.setattr(loop, "_log_bits_per_dim", lambda *a, **k: time.sleep(3) or evaluate(*a, **k))
    capsys.readouterr()
    assert run(argv) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "received SIGTERM: stopping the final evaluation; writing the checkpoint of the last step" in captured.err
    assert re.search(rf"^preempted \(SIGTERM\) during the final evaluation at step 3: saved {re.escape(str(out))}"
                     r"/checkpoint-3; resume with: .* --resume_from_checkpoint latest$", captured.out, re.MULTILINE)  # fmt: skip
    assert (out / "checkpoint-3").is_dir() and not (out / PIPELINE).exists() and not (out / "samples.png").exists()

    monkeypatch.undo()
    assert run([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert (out / PIPELINE).exists() and (out / "samples.png").exists()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["optimizer_steps"] == 3 and "eval" in summary
    # the time trained: the 3 steps, not the 3 s the interrupted evaluation took
    recorded = json.loads((out / "checkpoint-3" / RUN_RECORD).read_text())["seconds"]
    assert 0 < recorded <= summary["train_seconds"] < 3, (recorded, summary["train_seconds"])


def test_a_signal_during_the_save_lets_it_finish_and_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    signal_in(monkeypatch, "_save_pipeline")
    capsys.readouterr()
    assert run(tiny(out, "--max_train_steps", "2", "--checkpointing_steps", "100")) == 0  # the run is complete
    captured = capsys.readouterr()
    assert "received SIGTERM: finishing the save of the pipeline (seconds), then stopping" in captured.err
    assert f"received SIGTERM during the save: the save finished and the run is complete ({out})" in captured.out
    assert (out / PIPELINE).exists() and (out / "training_summary.json").exists()
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow  # a launched run with a long final evaluation: about a minute each
@pytest.mark.parametrize("launcher", ["python", "accelerate launch"])
def test_sigterm_during_the_final_evaluation_of_a_real_run_writes_the_checkpoint_it_promises(tmp_path, launcher):
    out = tmp_path / "out"
    argv = launch_flags(
        out,
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--ddpm_num_steps",
        "1000",
        "--ddpm_num_inference_steps",
        "1000",
        "--eval_batch_size",
        "64",
    )  # a grid of a minute or so
    command = launch_command(argv) if launcher != "python" else [sys.executable, str(REPO / "training" / "train.py"),
                                                                 *argv]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "wb") as f:
        process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "step 3: sample grid" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)  # as a scheduler stops a job: the launcher and the trainer
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, text[-3000:]  # the trainer's, or the launcher's after it
    assert "received SIGTERM: stopping the final evaluation; writing the checkpoint of the last step" in text
    assert re.search(rf"preempted \(SIGTERM\) during the final evaluation at step 3: saved {re.escape(str(out))}"
                     r"/checkpoint-3; resume with: .*--resume_from_checkpoint latest", text), text[-3000:]  # fmt: skip
    assert (out / "checkpoint-3").is_dir() and not (out / "model_index.json").exists()
