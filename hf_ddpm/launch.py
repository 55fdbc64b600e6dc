"""How this process was launched, the command that launches it again the same way, and how the launched processes
agree that one of them failed.

`accelerate launch` starts one worker per process (through torchrun when there are several) and tells each what the
launch asked for in its environment: ACCELERATE_MIXED_PRECISION (always set by accelerate launch), ACCELERATE_USE_CPU
(`--cpu`, or set by hand for a multi-process CPU run), and torchrun's RANK and WORLD_SIZE. A training run records
these facts in its checkpoints and prints the command that resumes it (stopped, or refused for its process count: as
the checkpoint's run was launched); `launch_command` writes that command so that it reproduces the launch: the
launcher, the process count, the precision and the CPU choice.

An error met by one process (the main one writing a file, a worker's disk) must stop every process, or the others
wait at the next collective until it times out: `any_process_failed` is that agreement, one all-reduce. A launcher
killed alone (SIGKILL) tells its workers nothing: `watch_launcher` stops them as a cluster's signal would.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading

from .flags import canonical


def launched_by_accelerate() -> bool:
    """Whether `accelerate launch` started this process (it always sets ACCELERATE_MIXED_PRECISION)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def cpu_requested() -> bool:
    """Whether the launch asked accelerate for the CPU (`accelerate launch --cpu`, or ACCELERATE_USE_CPU=1, which
    a multi-process CPU launch needs: without it each worker is a 1-process run of its own)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU")


def later_rank() -> bool:
    """Whether this process is a launcher's worker other than rank 0 (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") not in ("", "0")


def watch_launcher(signum: int, interval: float = 1.0):
    """Under `accelerate launch`, send this process `signum` once its launcher is gone (killed alone: a worker would
    otherwise train on to the end, holding the output directory's lock against the job's requeue), so that the run
    stops as on that signal (hf_ddpm/training/interruptions.py: a checkpoint at the next optimizer step), saying why.
    Only a machine's first process watches: it stops the others through the loop's agreement (one line, not one per
    process). Returns the function that stops the watch; None where nothing is watched."""
    if not launched_by_accelerate() or os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        return None
    launcher, stopped = os.getppid(), threading.Event()

    def watch():
        while not stopped.wait(interval):
            if os.getppid() != launcher:  # re-parented: the launcher died
                name = signal.Signals(signum).name
                with contextlib.suppress(OSError):  # its stderr may have gone with it
                    print(
                        f"\nthe launcher (PID {launcher}) is gone: stopping as on {name}", file=sys.stderr, flush=True
                    )
                os.kill(os.getpid(), signum)
                return

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return stopped.set


def launch_processes() -> int:
    """The run's process count as accelerate makes it (its PartialState, which the Accelerator then shares), never
    an environment variable. Workers started as one run (WORLD_SIZE > 1) that accelerate turns into separate
    1-process runs (`--multi_gpu` on a machine without GPUs, the CPU not asked for) are refused at once, with the fix:
    each would otherwise train alone, and all but one would find the output directory in use."""
    from accelerate import PartialState

    workers = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher started, read before accelerate sets it
    processes = PartialState(cpu=cpu_requested()).num_processes
    if workers > 1 and processes == 1:
        raise ValueError(
            f"{workers} workers were started (WORLD_SIZE={workers}) but accelerate made each a separate 1-process run: "
            f"no GPU is used and the CPU was not asked for. On a CPU, launch with `ACCELERATE_USE_CPU=1 accelerate "
            f"launch --multi_gpu --num_processes {workers} ...`"
        )
    return processes


def launch_command(options: list[str], num_processes: int, mixed_precision: str, cpu: bool | None = None,
                   accelerate: bool | None = None) -> str:  # fmt: skip
    """The command that runs this process's script (`training/train.py`, or `-m hf_ddpm.train` from an installed
    wheel) with `options`, launched as this process was (or as a checkpoint's record says its run was): under
    `accelerate launch` with `num_processes` and `mixed_precision` when it started it (`accelerate`, default: this
    process's environment) or when there are several processes, else with `python`; on the CPU when the launch asked
    for it (`cpu`, default: this process's environment)."""
    script = [sys.argv[0] if sys.argv and sys.argv[0] else "training/train.py"]
    if os.path.abspath(script[0]) == os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"):
        script = ["-m", "hf_ddpm.train"]
    cpu = cpu_requested() if cpu is None else cpu
    accelerate = launched_by_accelerate() if accelerate is None else accelerate
    env = ["ACCELERATE_USE_CPU=1"] if cpu else []
    if num_processes > 1 or accelerate:
        if num_processes > 1:  # `--cpu` and `--multi_gpu` exclude each other: the CPU is asked for in the environment
            processes = ["--multi_gpu", "--num_processes", str(num_processes)]
        else:
            env, processes = [], ["--cpu"] * cpu + ["--num_processes", "1"]
        prefix = ["accelerate", "launch", *processes, "--mixed_precision", mixed_precision]
    else:
        prefix = ["python"]
    return " ".join([*env, shlex.join([*prefix, *script, *options])])


# Dropped from the resume command: it resumes (once) what is in the output directory, and accepts no change.
LAUNCH_FLAGS = ("--resume_from_checkpoint", "--overwrite_output_dir", "--allow_data_change", "--allow_schedule_change")
VALUED_FLAGS = ("--resume_from_checkpoint",)


def resume_command(argv: list[str], num_processes: int, mixed_precision: str, cpu: bool | None = None,
                   accelerate: bool | None = None, checkpoint: str = "latest") -> str:  # fmt: skip
    """The command that resumes this run: the same options (`argv`) with `--resume_from_checkpoint latest` (or
    `checkpoint`), launched as this run was (`launch_command`; a refused resume: as its checkpoint's run was)."""
    options, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = "--" + canonical(arg.partition("=")[0]) if arg.startswith("--") else arg
        if name in LAUNCH_FLAGS:
            skip = name in VALUED_FLAGS and "=" not in arg
            continue
        options.append(arg)
    options += ["--resume_from_checkpoint", checkpoint]
    return launch_command(options, num_processes, mixed_precision, cpu, accelerate)


# ------------------------------------------------------------------------------------------------ agreeing on a failure

_DONE_WORK: list = []  # any_process_failed's finished all-reduces: freed at exit by the main thread, see there


def any_process_failed(accelerator, failed: bool) -> bool:
    """Whether `failed` holds on any process. Every process must call it (a collective in DDP): an error on one
    process then stops them all, instead of leaving the others waiting at the next barrier until it times out.

    The finished all-reduce is kept here. Freed by gloo's worker thread instead, it would release its Python
    tensor there, which needs the GIL; a main thread that is by then destroying the process group (the end of a
    run, or an error raised right after this call) holds the GIL while it joins that thread: a deadlock, seen as a
    2-process CPU run that never exits."""
    if accelerator.num_processes == 1:
        return failed
    import torch  # here: the entry points read later_rank before torch is imported

    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return accelerator.reduce(flag, "sum").item() > 0  # other backends (XLA)
    work = torch.distributed.all_reduce(flag, async_op=True)  # SUM
    work.wait()
    _DONE_WORK.append(work)
    return flag.item() > 0


class MainProcessFailed(RuntimeError):
    """Raised by the processes that heard of another's error (`raise_if_any_failed`): that process says why."""


def raise_if_any_failed(accelerator, error: Exception | None, what: str) -> None:
    """Every process hears whether the main process failed to do `what`; all raise (its error, or one naming it)."""
    if any_process_failed(accelerator, error is not None):
        raise error or MainProcessFailed(f"the main process failed to {what} (its error says why)")
