"""Faults: SIGKILL at chosen and at random moments (inside a checkpoint write, inside the final pipeline save), a full
disk or a read-only output directory, NaN/inf losses and weights, and a Hub connection dropped in the middle of a push.

Killed runs are subprocesses (tests/fault_hooks.py pauses them at an exact point when asked; the test kills them
there); resumed and reference runs train in this process. Both use one thread, so their weights agree bit for bit.
"""

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from fault_hooks import HOOKS, start_training, stop, wait_for_marker
from hub_clients import tree_hashes
from hub_server import HubServer
from push_runs import PUSHED, assert_failed_cleanly, start_cli, start_pushes, wait
from safetensors.torch import load_file
from training_runs import REPO, assert_same_weights, environment, launch_command, reset_accelerate, tiny

import hf_ddpm.training.loop as loop
from hf_ddpm import HFDDPMPipeline
from hf_ddpm.training import checkpoints, parse_args, train
from hf_ddpm.training.checkpoints import CheckpointWriteError
from hf_ddpm.training.interruptions import MAX_CONSECUTIVE_SKIPS, NonFiniteError
from hf_ddpm.training.output_dir import LOCK_NAME, MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

RUN = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--random_flip", "--learning_rate", "1e-3"]
RECORDS = [MANIFEST_NAME, LOCK_NAME]  # what every run keeps in its output directory (sorted: dot-names first)
CHECKPOINT_FILES = {
    "custom_checkpoint_0.pkl",
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "run_record.json",
    "scheduler.bin",
}  # fmt: skip (custom_checkpoint_0: the EMA)


def resume(out: Path, *extra) -> dict:
    return train(parse_args(tiny(out, *extra, "--resume_from_checkpoint", "latest")))


# ------------------------------------------------------------------------------------------------ SIGKILL


def test_killed_inside_a_checkpoint_write_and_the_final_save_it_resumes_to_the_same_weights(tmp_path):
    reference = tmp_path / "reference"
    train(parse_args(tiny(reference, *RUN)))
    reset_accelerate()
    out = tmp_path / "out"

    stop(start_training(tmp_path, tiny(out, *RUN), pause_at="checkpoint-6"))  # every part written, not renamed
    assert (out / "checkpoint-6.tmp").is_dir() and not (out / "model_index.json").exists()
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [2, 4]  # `latest` never picks the .tmp

    argv = tiny(out, *RUN, "--resume_from_checkpoint", "latest")
    stop(start_training(tmp_path, argv, pause_at="pipeline"))  # components swapped in, model_index.json not yet
    assert (out / "unet").is_dir() and not (out / "model_index.json").exists()
    with pytest.raises(ValueError, match="holds no model_index.json: it is not a saved pipeline, or its save did"):
        HFDDPMPipeline.from_pretrained(out)
    with pytest.raises(OSError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(out, trust_remote_code=True)

    resume(out, *RUN)
    assert_same_weights(reference, out, ("unet/diffusion_pytorch_model.safetensors", "checkpoint-8/model.safetensors"))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # leftovers cleaned up at start-up
    assert {p.name for p in out.iterdir()} == {p.name for p in reference.iterdir()}


def check_output_dir(out: Path) -> None:
    """What a SIGKILL may leave: complete checkpoints under their names, and a pipeline that loads or none."""
    for _, path in checkpoints.list_checkpoints(out):
        assert {p.name for p in Path(path).iterdir()} == CHECKPOINT_FILES, path
        load_file(str(Path(path) / "model.safetensors"))
    if (out / "model_index.json").exists():
        HFDDPMPipeline.from_pretrained(out)
    if (out / "training_summary.json").exists():
        json.loads((out / "training_summary.json").read_text())


RANDOM_RUN = ["--max_train_steps", "24", "--checkpointing_steps", "3", "--checkpoints_total_limit", "2",
              "--save_model_steps", "4", "--random_flip", "--learning_rate", "1e-3"]  # fmt: skip


@pytest.mark.slow  # ~3 minutes per seed: a dozen process start-ups
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkills_at_random_moments_never_leave_a_half_written_output(tmp_path, seed, monkeypatch):
    """Kill the run at random moments after its first step (checkpoints and pipeline snapshots are written every
    few steps, so kills land inside writes too), check what is left, resume with `latest`, until the run ends."""
    reference, first_step, log = tmp_path / "reference", [], Accelerator.log
    monkeypatch.setattr(
        Accelerator, "log", lambda self, *a, **k: first_step.append(time.monotonic()) or log(self, *a, **k)
    )
    train(parse_args(tiny(reference, *RANDOM_RUN)))
    span = time.monotonic() - first_step[0]  # from the first step to the end of the final save
    monkeypatch.undo()
    reset_accelerate()
    rng, out, kills = random.Random(seed), tmp_path / "out", []
    for attempt in range(8):
        resume_flag = ["--resume_from_checkpoint", "latest"] if attempt else []
        process = start_training(tmp_path, tiny(out, *RANDOM_RUN, *resume_flag), pause_at="first-step")
        if wait_for_marker(process):
            # within the first half of a whole run's span: the first attempt is killed (a kill drawn near the span's
            # end found the process finished whenever it ran faster than the reference), and a resumed attempt,
            # having less left to do, is killed anywhere up to its final save
            time.sleep(rng.uniform(0, span / 2))
        else:
            process.wait()
        if process.poll() is not None:
            assert process.returncode == 0, (tmp_path / "training.log").read_text()[-3000:]
            break
        stop(process, wait_for_pause=False)
        latest = max([step for step, _ in checkpoints.list_checkpoints(out)], default=0)
        kills.append((latest, sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))))
        check_output_dir(out)
    else:
        resume(out, *RANDOM_RUN)
    print(f"seed {seed}: {len(kills)} kills (latest checkpoint, unfinished writes left): {kills}")
    assert kills
    files = ("unet/diffusion_pytorch_model.safetensors", "checkpoint-24/model.safetensors")
    assert_same_weights(reference, out, files)


# ------------------------------------------------------------------------------------------------ disk


@pytest.mark.parametrize(
    "error, shown",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device: .*optimizer.bin"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied: .*optimizer.bin"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "RuntimeError: Pytorch"),
    ],
)
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, error, shown):
    """Injected in-process where a full disk or a permission error strikes: inside accelerate's save_state, after
    part of the checkpoint was written (torch.save raises RuntimeError on a full disk, not OSError)."""
    out, original, seen = tmp_path / "out", Accelerator.save_state, {}

    def failing(self, output_dir=None, **kwargs):
        if not output_dir.endswith("checkpoint-4.tmp"):
            return original(self, output_dir, **kwargs)
        seen["checkpoint-2"] = tree_hashes(out / "checkpoint-2")
        (Path(output_dir) / "model.safetensors").write_bytes(b"the first bytes")  # what the full disk took
        if isinstance(error, OSError):
            error.filename = str(Path(output_dir) / "optimizer.bin")
        raise error

    monkeypatch.setattr(Accelerator, "save_state", failing)
    message = rf"could not write the step-4 checkpoint {out}/checkpoint-4 \({shown}.*\); nothing of it was kept and "
    message += rf"the previous checkpoint, {out}/checkpoint-2, is intact. Free space in .*--resume_from_checkpoint"
    with pytest.raises(CheckpointWriteError, match=message):
        train(parse_args(tiny(out, *RUN)))
    assert tree_hashes(out / "checkpoint-2") == seen["checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == [*RECORDS, "checkpoint-2", "logs", "training_args.json"]
    monkeypatch.undo()
    reset_accelerate()
    resume(out, *RUN)  # space freed: the run goes on from checkpoint-2
    assert (out / "model_index.json").exists() and (out / "checkpoint-8").is_dir()


NAMESPACE_SCRIPT = """
import json, os, subprocess, sys
from pathlib import Path
import torch
from accelerate.state import AcceleratorState, GradientState
import hf_ddpm.training.checkpoints as checkpoints
from hf_ddpm.training import parse_args, train

torch.set_num_threads(1)
base, argv = Path(sys.argv[1]), sys.argv[2:]
sh = lambda *command: subprocess.run(command, check=True, capture_output=True)
sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(base))  # in this process's own mount namespace
save, action, results = checkpoints.save_checkpoint, [None], {}

def hooked(accelerator, output_dir, record, total_limit=None):
    if record.step == 4 and action[0]:
        action[0](output_dir)
    return save(accelerator, output_dir, record, total_limit)

def fill(output_dir):  # a real full disk: write until the kernel says ENOSPC
    fd = os.open(base / "filler", os.O_WRONLY | os.O_CREAT)
    for size in (2**20, 2**10, 1):
        try:
            while True:
                os.write(fd, b"x" * size)
        except OSError:
            pass
    os.close(fd)

def read_only(output_dir):  # a read-only bind mount over the output directory (its open log files stay writable)
    sh("mount", "--bind", output_dir, output_dir)
    sh("mount", "-o", "remount,ro,bind", output_dir, output_dir)

def run(out, *extra):
    try:
        train(parse_args(["--output_dir", str(out), *argv, *extra]))
        return "ok"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

checkpoints.save_checkpoint = hooked
for case, act, undo in [("full", fill, lambda out: (base / "filler").unlink()),
                        ("read-only", read_only, lambda out: sh("umount", str(out)))]:
    out = base / case
    action[0] = act
    failed = run(out)
    listing = sorted(p.name for p in out.iterdir())
    undo(out)
    action[0] = None
    results[case] = {"error": failed, "listing": listing, "resumed": run(out, "--resume_from_checkpoint", "latest"),
                     "after": sorted(p.name for p in out.iterdir())}
sh("mount", "--bind", str(base / "full"), str(base / "full"))
sh("mount", "-o", "remount,ro,bind", str(base / "full"), str(base / "full"))
results["start-up"] = run(base / "full" / "new")
print(json.dumps(results))
"""


def test_a_real_full_disk_and_a_read_only_directory_during_a_checkpoint(tmp_path):
    """The kernel's own ENOSPC (a 64 MB tmpfs filled up) and EROFS (a read-only bind mount), in a private mount
    namespace (`unshare --mount`: root only; skipped elsewhere, where the injected errors above stand in)."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "namespace.py"
    script.write_text(NAMESPACE_SCRIPT)
    (tmp_path / "mnt").mkdir()
    argv = tiny(tmp_path / "unused", *RUN)[2:]  # without --output_dir
    command = ["unshare", "--mount", sys.executable, str(script), str(tmp_path / "mnt"), *argv]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    base = tmp_path / "mnt"
    for case, reason in [("full", "No space left on device"), ("read-only", "Read-only file system")]:
        run = results[case]
        assert run["error"].startswith("CheckpointWriteError: "), run["error"]
        assert f"could not write the step-4 checkpoint {base}/{case}/checkpoint-4 (" in run["error"]
        assert (
            reason in run["error"] and f"the previous checkpoint, {base}/{case}/checkpoint-2, is intact" in run["error"]
        )
        assert run["listing"] == [*RECORDS, "checkpoint-2", "logs", "training_args.json"]  # no .tmp, no pipeline
        assert run["resumed"] == "ok" and "model_index.json" in run["after"] and "checkpoint-8" in run["after"]
    assert results["start-up"].startswith(f"OSError: --output_dir {base}/full/new is not writable (Read-only file")


# ------------------------------------------------------------------------------------------------ NaN and inf


def test_a_nan_loss_stops_the_run_at_its_step_and_no_nan_weights_are_written(tmp_path):
    """A learning rate of 1e30: step 1 sends the weights to ~1e30, step 2's loss is NaN."""
    out = tmp_path / "out"
    message = r"step 2: the loss is nan and the gradient norm nan; training stopped \(--on_nan stop\) and wrote "
    message += rf"nothing of this step: the last checkpoint, {out}/checkpoint-1, is intact. .*--on_nan skip"
    with pytest.raises(NonFiniteError, match=message) as stopped:
        train(parse_args(tiny(out, "--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "1e30")))
    # advice that works: a resume restores the run's learning rate (resolve.py), so a lower one means a new run
    assert "start again (--overwrite_output_dir) with a lower --learning_rate" in str(stopped.value)
    assert "resume with --on_nan skip" in str(stopped.value) and "lower --learning_rate and resume" not in str(
        stopped.value
    )
    assert sorted(p.name for p in out.iterdir()) == [*RECORDS, "checkpoint-1", "logs", "training_args.json"]
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    ema = torch.load(out / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]
    assert all(torch.isfinite(t).all() for t in [*weights.values(), *ema])


def test_weights_that_turn_nan_are_never_written(tmp_path, monkeypatch):
    """A finite loss but NaN weights after the update (injected into AdamW): the checkpoint guard refuses."""
    step, calls = torch.optim.AdamW.step, [0]

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            self.param_groups[0]["params"][0].data[0] = torch.nan
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"step 2: the weights hold NaN or inf \(conv_in.weight, ema:conv_in"):
        train(parse_args(tiny(out, "--max_train_steps", "4", "--checkpointing_steps", "1")))
    assert sorted(p.name for p in out.iterdir()) == [*RECORDS, "checkpoint-1", "logs", "training_args.json"]


def nan_at(monkeypatch, calls: set[int] | None) -> None:
    """The loss of these calls of training_losses (counting from 1; None: every call) is NaN."""
    losses, count = loop.training_losses, [0]

    def nan_losses(*args, **kwargs):
        terms = losses(*args, **kwargs)
        count[0] += 1
        if calls is None or count[0] in calls:
            terms["loss"] = terms["loss"] * torch.nan
        return terms

    monkeypatch.setattr(loop, "training_losses", nan_losses)


def test_on_nan_skip_drops_that_steps_update_and_goes_on(tmp_path, monkeypatch, caplog):
    nan_at(monkeypatch, {3})
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="hf_ddpm.training.interruptions"):
        summary = train(
            parse_args(tiny(out, "--max_train_steps", "5", "--checkpointing_steps", "5", "--on_nan", "skip"))
        )
    assert summary["skipped_steps"] == [3] and summary["optimizer_steps"] == 5
    assert (
        "step 3: the loss is nan and the gradient norm nan: skipped its update (--on_nan skip; 1 skipped" in caplog.text
    )
    optimizer = torch.load(out / "checkpoint-5" / "optimizer.bin", weights_only=False)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {4.0}  # 5 steps, 4 updates
    pipe = HFDDPMPipeline.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    assert json.loads((out / "training_summary.json").read_text())["skipped_steps"] == [3]


def test_on_nan_skip_still_stops_when_every_step_fails(tmp_path, monkeypatch):
    nan_at(monkeypatch, None)
    out = tmp_path / "out"
    steps = str(MAX_CONSECUTIVE_SKIPS + 2)
    with pytest.raises(NonFiniteError, match=rf"step {MAX_CONSECUTIVE_SKIPS}: .* non-finite step in a row"):
        train(parse_args(tiny(out, "--max_train_steps", steps, "--checkpointing_steps", "100", "--on_nan", "skip")))
    assert not (out / "model_index.json").exists()


@pytest.mark.slow  # two 2-process launches, ~1 minute each
@pytest.mark.parametrize(
    "fault, shown",
    [
        ({"FAULT_NAN_RANK": "1", "FAULT_NAN_CALL": "3"}, "step 3: the loss is nan"),
        ({"FAULT_ENOSPC_RANK": "0", "FAULT_ENOSPC_STEP": "4"}, "could not write the step-4 checkpoint"),
    ],
)
def test_a_fault_on_one_ddp_process_stops_both_instead_of_hanging(tmp_path, fault, shown):
    """A NaN loss on rank 1 only, a full disk on rank 0 only: both processes stop at the same step with the error
    (the other rank learns it through the reduced loss, or a reduced failure flag) instead of waiting forever."""
    out = tmp_path / "out"
    command = launch_command(tiny(out, *RUN), num_processes=2)
    command[command.index(str(REPO / "training" / "train.py"))] = str(HOOKS)
    env = environment() | fault
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and log.count(shown) >= 2, log[-4000:]  # raised on both ranks
    assert sorted(p.name for p in out.iterdir()) == [*RECORDS, "checkpoint-2", "logs", "training_args.json"]


@pytest.mark.slow  # a 2-process launch and its resume, ~1.5 minutes
def test_a_launcher_killed_alone_stops_its_workers_with_a_checkpoint_and_the_requeue_resumes(tmp_path):
    """`kill -9` of `accelerate launch` alone (its workers are not told): they stop as on SIGTERM, at the next
    optimizer step with its checkpoint, and free the output directory, so the job's requeue resumes at once instead
    of being refused while orphans train on to the end."""
    out, log = tmp_path / "out", tmp_path / "log"
    flags = tiny(out, "--max_train_steps", "1000", "--checkpointing_steps", "2", "--save_images_steps", "1000")
    with open(log, "wb") as f:
        launcher = subprocess.Popen(launch_command(flags, num_processes=2), cwd=REPO, env=environment(), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2").is_dir():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15  # they notice within a second, then finish their step (not the 1000th)
        while workers_of(out):
            assert time.monotonic() < deadline, (workers_of(out), log.read_text()[-3000:])
            time.sleep(0.2)
    finally:
        for pid in workers_of(out):
            os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    stopped = max(step for step, _ in checkpoints.list_checkpoints(str(out)))
    assert text.count(f"the launcher (PID {launcher.pid}) is gone: stopping as on SIGTERM") == 1, text[-3000:]
    assert f"preempted (SIGTERM) at step {stopped}: saved {out / f'checkpoint-{stopped}'}" in text, text[-3000:]
    assert 2 <= stopped < 1000 and not (out / "model_index.json").exists()
    resumed = subprocess.run(launch_command([*flags, "--resume_from_checkpoint", "latest"], num_processes=2),
                             cwd=REPO, env=environment(), capture_output=True, text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at optimizer step {stopped}" in resumed.stderr
    assert json.loads((out / "training_summary.json").read_text())["optimizer_steps"] == 1000


def workers_of(out: Path) -> list[int]:
    """The processes whose command line names `out` (the launch's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


# ------------------------------------------------------------------------------------------------ the Hub


def test_a_connection_dropped_mid_push_fails_cleanly_and_pushing_again_works(tmp_path):
    """The repo is created and the upload planned, then the commit's connection drops unanswered."""
    hub = HubServer(tmp_path)
    try:
        hub.fail("^POST /api/models/test-user/dropped/commit/", "drop")
        run = wait(
            start_pushes(hub, tmp_path, {"drop": ("test-user/dropped", [], {"HF_HUB_DISABLE_XET": "1"})})["drop"]
        )
        assert_failed_cleanly(run, "RemoteProtocolError")
        assert set(hub.files("test-user/dropped")) == {".gitattributes"}  # created; nothing committed
        hub.clear()
        printed = run["stderr"].split("To push it again, run:\n")[1].splitlines()[0].split()
        retry = start_cli(hub, tmp_path / "drop", printed[3:], {"HF_HUB_DISABLE_XET": "1"})
        assert wait({"process": retry})["returncode"] == 0
        assert set(hub.files("test-user/dropped")) == PUSHED and tree_hashes(run["out"]) == run["before"]
    finally:
        hub.stop()
