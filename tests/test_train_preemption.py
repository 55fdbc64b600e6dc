"""Preemption with real signals: SIGTERM / SIGINT / SIGUSR1 at a random step stop the run at the next optimizer-step
boundary with a checkpoint of that step, one line naming it and the command that resumes, and exit status 128 + the
signal number; the printed command resumes, and the run ends bit-identical to an uninterrupted one. Single process
(`python training/train.py`) and two-process DDP under `accelerate launch` (a signal to one rank only, and to the
launcher, as SLURM's `scancel --signal` / `--signal=TERM@120` and Ctrl-C do).

Trained runs are subprocesses (tests/fault_hooks.py: FAULT_STEP_SLEEP slows each step so that a signal lands
mid-run; FAULT_PID_DIR tells each rank's PID); the single-process reference trains in this process.
"""

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_hooks import HOOKS, SLOW_CACHE_BUILD, alive, children, start_training, wait_for_marker
from training_runs import REPO, assert_same_weights, environment, free_port, launch_command, tiny

from hf_ddpm.launch import resume_command
from hf_ddpm.training import checkpoints, parse_args, train
from hf_ddpm.training.interruptions import Preempted, PreemptionHandler, exit_status, parse_signals

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

STEPS = 40
RUN = ["--max_train_steps", str(STEPS), "--checkpointing_steps", "100", "--random_flip", "--learning_rate", "1e-3"]
LINE = re.compile(r"preempted \((SIG\w+)\) at step (\d+): saved (\S+); resume with: (.+)")
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", f"checkpoint-{STEPS}/model.safetensors")


def preempted_line(log: str) -> tuple[str, int, str, list[str]]:
    (match,) = LINE.findall(log)
    name, step, path, command = match
    return name, int(step), path, shlex.split(command)


def run_printed(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the printed resume command as a user would: with its own `VAR=value` prefix as the only ACCELERATE_USE_CPU
    (the tests' is removed), this interpreter and (for accelerate) a free port."""
    env = environment()
    del env["ACCELERATE_USE_CPU"]
    while "=" in command[0]:
        name, value = command.pop(0).split("=", 1)
        env[name] = value
    if command[:2] == ["accelerate", "launch"]:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                   "--num_cpu_threads_per_process", "1", *command[2:]]  # fmt: skip
    else:
        assert command[0] == "python"
        command = [sys.executable, *command[1:]]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (a checkpoint at its last step for the comparison)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train(parse_args(tiny(out, *RUN, "--checkpointing_steps", str(STEPS))))
    return out


def signal_at_random_step(process, seed: int, sig: int, pid: int | None = None) -> None:
    assert wait_for_marker(process), process.log.read_text()[-3000:]
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # steps take >= 0.05 s: a random step of the first ~20
    os.kill(pid or process.pid, sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_the_current_step_and_the_printed_command_resumes_exactly(tmp_path, reference, sig):
    out = tmp_path / "out"
    argv = tiny(out, *RUN, "--checkpointing_steps", str(STEPS))
    process = start_training(tmp_path, argv, pause_at="first-step", FAULT_STEP_SLEEP="0.05")
    signal_at_random_step(process, seed=sig, sig=sig)
    assert process.wait(timeout=120) == exit_status(sig) == 128 + sig, process.log.read_text()[-3000:]
    name, step, path, command = preempted_line(process.log.read_text())
    assert name == signal.Signals(sig).name and 1 <= step < STEPS
    assert path == str(out / f"checkpoint-{step}") and [s for s, _ in checkpoints.list_checkpoints(out)] == [step]
    assert "--resume_from_checkpoint" in command and command[-2:] == ["--resume_from_checkpoint", "latest"]
    resumed = run_printed(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {path} at optimizer step {step}" in resumed.stderr
    assert_same_weights(reference, out, WEIGHTS)


def ddp_reference(tmp_path: Path, argv: list[str]) -> Path:
    out = tmp_path / "reference"
    command = launch_command([*argv[:1], str(out), *argv[2:]], num_processes=2)
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def start_ddp(tmp_path: Path, argv: list[str]) -> subprocess.Popen:
    command = launch_command(argv, num_processes=2)
    command[command.index(str(REPO / "training" / "train.py"))] = str(HOOKS)
    marker, pids = tmp_path / "marker", tmp_path / "pids"
    pids.mkdir()
    env = environment() | {"FAULT_PAUSE_AT": "first-step", "FAULT_MARKER": str(marker), "FAULT_STEP_SLEEP": "0.05",
                           "FAULT_PID_DIR": str(pids)}  # fmt: skip
    log = open(tmp_path / "ddp.log", "wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.marker, process.log, process.pids = marker, tmp_path / "ddp.log", pids
    return process


def rank_pid(process, rank: int) -> int:
    path = process.pids / f"rank-{rank}"
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline and process.poll() is None, process.log.read_text()[-3000:]
        time.sleep(0.02)
    return int(path.read_text())


@pytest.mark.parametrize(
    "target, sig, resume",
    [
        ("rank-1", signal.SIGTERM, False),  # one rank only: both agree through the loss all-reduce (fast: one launch)
        pytest.param("rank-1", signal.SIGINT, True, marks=pytest.mark.slow),
        pytest.param("launcher", signal.SIGTERM, True, marks=pytest.mark.slow),  # torchrun forwards it to both
        pytest.param("launcher", signal.SIGINT, True, marks=pytest.mark.slow),  # Ctrl-C in a terminal
    ],
)
def test_ddp_processes_agree_on_a_signal_and_resume_to_the_uninterrupted_weights(tmp_path, target, sig, resume):
    argv = tiny(tmp_path / "out", *RUN, "--checkpointing_steps", str(STEPS))
    process = start_ddp(tmp_path, argv)
    pids = {rank: rank_pid(process, rank) for rank in (0, 1)}
    signal_at_random_step(process, seed=sig, sig=sig, pid=process.pid if target == "launcher" else pids[1])
    returncode = process.wait(timeout=200)
    log = process.log.read_text()
    name, step, path, command = preempted_line(log)  # printed once, by the main process
    # the notice too: rank 0's alone, on a line of its own (none when only rank 1 got the signal)
    assert log.count("received SIG") == (target == "launcher") and "]received" not in log, log[-3000:]
    assert 1 <= step < STEPS and [s for s, _ in checkpoints.list_checkpoints(tmp_path / "out")] == [step]
    assert name == signal.Signals(sig).name  # rank 0 learns the signal of rank 1 from the all-reduce
    if target == "launcher":  # accelerate exits with 128 + the signal, as the signal's default action would
        assert returncode == 128 + sig, log[-3000:]
    else:  # each rank exits 128 + the signal; torchrun reports a failed child and accelerate exits 1
        assert returncode == 1 and re.search(rf"exitcode\s*: {exit_status(sig)}\b", log), log[-3000:]
    # the launch that ran: without ACCELERATE_USE_CPU=1 the two workers would each be a 1-process run
    assert command[:6] == ["ACCELERATE_USE_CPU=1", "accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    if not resume:
        return
    reference = ddp_reference(tmp_path, argv)
    resumed = run_printed(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    hashes = dict(re.findall(r"process (\d)/2: parameter sha256 (\w+ ema sha256 \w+)", resumed.stderr))
    assert hashes["0"] == hashes["1"]
    assert_same_weights(reference, tmp_path / "out", WEIGHTS)


@pytest.mark.slow  # a 2-process launch each, and one resume
@pytest.mark.parametrize("rank", [0, 1])
def test_a_ddp_process_killed_alone_ends_the_run_in_seconds_naming_the_last_checkpoint_and_resume(tmp_path, rank):
    """The OOM killer's SIGKILL of one process: the other's next collective fails. It said gloo's own message
    (`[…/pair.cc:537] Read error …: Connection reset by peer … GLHF!`); now one line says another process of the run
    ended, that nothing of the step was written, the last checkpoint and the command that resumes from it."""
    out = tmp_path / "out"
    process = start_ddp(tmp_path, tiny(out, "--max_train_steps", "400", "--checkpointing_steps", "5"))
    pids = {r: rank_pid(process, r) for r in (0, 1)}
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-5").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.log.read_text()[-3000:]
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(pids[rank], signal.SIGKILL)
    assert process.wait(timeout=60) == 1 and time.monotonic() - killed < 15, process.log.read_text()[-3000:]
    log = process.log.read_text(errors="replace")
    (line,) = re.findall(r"error: another process of this run ended.*", log)
    latest = checkpoints.list_checkpoints(out)[-1][1]
    assert "GLHF" not in log and "nothing of the step in progress was written" in line, log[-3000:]
    assert f"the last checkpoint is {latest}. Resume with: ACCELERATE_USE_CPU=1 accelerate launch" in line
    if rank == 1:
        return
    command = shlex.split(line.split("Resume with: ", 1)[1].split(" (the launcher's report")[0])
    command[command.index(str(HOOKS))] = str(REPO / "training" / "train.py")
    resumed = run_printed(command, tmp_path)
    assert resumed.returncode == 0 and f"resumed from {latest}" in resumed.stderr, resumed.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ units


def test_signal_names_are_parsed_and_unknown_ones_refused():
    assert parse_signals("TERM,SIGINT, usr1") == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert parse_signals("none") == ()
    with pytest.raises(ValueError, match="'KILL' is not a signal a process can catch"):
        parse_signals("TERM,KILL")
    with pytest.raises(ValueError, match="--preemption_signals 'TERM,BOGUS'"):
        parse_args(["--preemption_signals", "TERM,BOGUS"])


def test_a_second_ctrl_c_aborts_at_once_and_forked_children_ignore_the_signal(tmp_path):
    """In a child: the first SIGINT sets the flag (the handler returns), the second kills the process at once;
    a forked child (a DataLoader worker) that inherited the handler ignores the signal."""
    script = f"""
import importlib.util, os, signal, sys, time
path = {str(REPO / "hf_ddpm" / "training" / "interruptions.py")!r}
spec = importlib.util.spec_from_file_location("interruptions", path)
interruptions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interruptions)  # the module alone (torch, not the whole package): a quick child
PreemptionHandler = interruptions.PreemptionHandler
handler = PreemptionHandler((signal.SIGINT, signal.SIGTERM))
handler.install()
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGTERM)  # inherited handler, other PID: ignored
    os._exit(7 if handler.received is None else 1)
_, status = os.waitpid(child, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("first", handler.received, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("not reached", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGINT, result.stderr
    assert result.stdout.split() == ["child", "7", "first", str(int(signal.SIGINT))]
    assert "received SIGINT: stopping after this optimizer step with a checkpoint (Ctrl-C again aborts" in result.stderr


def test_the_resume_command_drops_resume_and_overwrite_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["training/train.py"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    argv = ["--output_dir", "my out", "--overwrite_output_dir", "--resume_from_checkpoint", "checkpoint-4"]
    assert (
        resume_command(argv, 1, "no")
        == "python training/train.py --output_dir 'my out' --resume_from_checkpoint latest"
    )
    assert resume_command(["--seed", "3"], 2, "bf16") == (
        "accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 training/train.py --seed 3 "
        "--resume_from_checkpoint latest"
    )
    monkeypatch.setattr(sys, "argv", [str(REPO / "hf_ddpm" / "train.py")])  # `accelerate launch -m hf_ddpm.train`
    assert resume_command([], 1, "no") == "python -m hf_ddpm.train --resume_from_checkpoint latest"
    assert isinstance(Preempted(15, "c", "x"), SystemExit) and Preempted(15, "c", "x").code == 143
    assert PreemptionHandler().received is None


# ------------------------------------------------------------------------------------------------ before the loop

SLOW_BUILD_TRAINING = (
    SLOW_CACHE_BUILD
    + """
from hf_ddpm.training.main import main
sys.exit(main(sys.argv[1:]))
"""
)


@pytest.mark.parametrize(
    "sig, group", [(signal.SIGINT, False), pytest.param(signal.SIGTERM, True, marks=pytest.mark.slow)]
)
def test_a_signal_while_the_cache_is_built_ends_the_run_at_once_in_one_line_leaving_nothing(tmp_path, sig, group):
    """Before the first step there is nothing to checkpoint, and the cache's worker pool cannot stop halfway cleanly:
    SIGINT to the trainer alone hung it, or printed each worker's KeyboardInterrupt traceback and `error:
    TimeoutError`; SIGTERM killed it without a word. Now: one line, status 128 + N in seconds, the pool's workers
    gone, and the new output directory removed; the next run builds the cache and trains."""
    from image_files import write_images

    folder, out, cache = write_images(tmp_path / "images", 4100, size=(8, 8)), tmp_path / "out", tmp_path / "cache"
    argv = tiny(out, "--train_data_dir", folder, "--cache_dir", str(cache), "--preprocessing_num_workers", "2")
    log = tmp_path / "log"  # a pool decodes 4096 images or more
    with open(log, "wb") as f:
        process = subprocess.Popen([sys.executable, "-c", SLOW_BUILD_TRAINING, *argv], cwd=REPO, env=environment(),
                                   stdout=f, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(workers := [p for p in children(process.pid) if alive(p)]) < 2:  # the pool is decoding
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)
        signalled = time.monotonic()
        os.killpg(process.pid, sig) if group else os.kill(process.pid, sig)
        assert process.wait(timeout=30) == exit_status(sig), log.read_text()[-3000:]
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert took < 10 and "Traceback" not in text and "error:" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == (
        f"received {signal.Signals(sig).name} before the first training step: stopped, nothing trained or written; "
        "the same command starts again"
    )
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "the pool's workers outlived the trainer"
    assert not out.exists()  # made by this run: no trace left
    train(parse_args(argv))  # the same command starts again: the cache is built, the run trains
    assert (out / "model_index.json").is_file()
