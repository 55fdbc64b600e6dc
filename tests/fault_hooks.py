"""Training in a process that a test can kill, or make fail, at an exact point.

`python tests/fault_hooks.py ARGV` (or as the script of `accelerate launch`) trains with ARGV as training/train.py
does (its `main`: one `error:` line, the preemption exit status), with these hooks chosen by environment variables:

    FAULT_PAUSE_AT=checkpoint-N   accelerate's save_state has written every part of checkpoint-N.tmp, and the
                                  rename that makes it a checkpoint comes next: write FAULT_MARKER, then sleep
    FAULT_PAUSE_AT=pipeline       the final pipeline's components are swapped in and model_index.json is not back
                                  yet (hf_ddpm.hub.save_hub_pipeline): write FAULT_MARKER, then sleep
    FAULT_PAUSE_AT=first-step     write FAULT_MARKER when the first optimizer step is logged (no pause)
    FAULT_STEP_SLEEP=S            sleep S seconds after each optimizer step's logs (a run long enough to signal)
    FAULT_PID_DIR=DIR             each process writes its PID to DIR/rank-<RANK> at its first optimizer step
    FAULT_NAN_RANK, FAULT_NAN_CALL    that process's FAULT_NAN_CALL-th loss (counting from 1) is NaN
    FAULT_ENOSPC_RANK, FAULT_ENOSPC_STEP    that process's save_state of checkpoint-STEP raises ENOSPC

The helpers below start such a process (one thread, offline, its output in training.log) and stop it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HOOKS = Path(__file__).resolve()
PAUSE = 600  # seconds: the test kills the process long before


def start_training(tmp_path: Path, argv: list[str], pause_at: str = "", **env) -> subprocess.Popen:
    from training_runs import REPO, environment

    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    variables = environment() | {"FAULT_PAUSE_AT": pause_at, "FAULT_MARKER": str(marker)} | env
    with open(tmp_path / "training.log", "ab") as log:
        process = subprocess.Popen([sys.executable, str(HOOKS), *argv], cwd=REPO, env=variables, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    process.marker, process.log = marker, tmp_path / "training.log"
    return process


def wait_for_marker(process: subprocess.Popen, timeout: float = 300) -> bool:
    """True once the process reached its FAULT_PAUSE_AT point; False if it ended first."""
    deadline = time.monotonic() + timeout
    while not process.marker.exists():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no {process.marker.name} within {timeout} s"
        time.sleep(0.02)
    return True


def stop(process: subprocess.Popen, wait_for_pause: bool = True) -> None:
    """SIGKILL the process (once it paused, unless told not to wait): a machine that dies, no cleanup at all."""
    if wait_for_pause:
        assert wait_for_marker(process), f"the run ended before its pause:\n{process.log.read_text()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


# The start of a `python -c` script whose data cache builds slowly (each image's decode sleeps): long enough to kill
# or signal the builder while its pool's workers decode.
SLOW_CACHE_BUILD = """
import sys, time
import hf_ddpm.data.cache as cache_module
real = cache_module.decode_image
def slow(*args, **kwargs):
    time.sleep(0.005)
    return real(*args, **kwargs)
cache_module.decode_image = slow
"""


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, which holds no file, is not: a container's init may never reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- the hooks


def _pause(marker: str, where: str) -> None:
    Path(marker + ".tmp").write_text(where)
    os.replace(marker + ".tmp", marker)
    time.sleep(PAUSE)


def _install(env) -> None:
    import accelerate
    import torch

    import hf_ddpm.atomic as atomic
    import hf_ddpm.training.loop as loop

    point, marker, rank = env.get("FAULT_PAUSE_AT", ""), env.get("FAULT_MARKER", ""), env.get("RANK", "0")
    save_state, log = accelerate.Accelerator.save_state, accelerate.Accelerator.log

    def hooked_save_state(self, output_dir=None, **kwargs):
        name = os.path.basename(output_dir)
        if env.get("FAULT_ENOSPC_RANK") == rank and name == f"checkpoint-{env.get('FAULT_ENOSPC_STEP')}.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "model.safetensors"))
        result = save_state(self, output_dir, **kwargs)
        if point.startswith("checkpoint-") and name == point + atomic.TMP_SUFFIX:
            _pause(marker, output_dir)
        return result

    def hooked_log(self, values, step=None, **kwargs):
        if env.get("FAULT_PID_DIR") and step == 1:
            path = Path(env["FAULT_PID_DIR"]) / f"rank-{rank}"
            Path(f"{path}.tmp").write_text(str(os.getpid()))
            os.replace(f"{path}.tmp", path)  # never read half-written
        if point == "first-step" and not os.path.exists(marker):
            Path(marker).write_text("training")
        result = log(self, values, step=step, **kwargs)
        time.sleep(float(env.get("FAULT_STEP_SLEEP", "0")))
        return result

    accelerate.Accelerator.save_state, accelerate.Accelerator.log = hooked_save_state, hooked_log
    if point == "pipeline":
        replace = Path.replace

        def hooked_replace(self, target):
            if self.name == "model_index.json" and self.parent.name == ".pipeline.tmp":
                _pause(marker, str(target))
            return replace(self, target)

        Path.replace = hooked_replace
    if env.get("FAULT_NAN_RANK") == rank:
        losses, calls = loop.training_losses, [0]

        def nan_losses(*args, **kwargs):
            terms = losses(*args, **kwargs)
            calls[0] += 1
            if calls[0] == int(env["FAULT_NAN_CALL"]):
                terms["loss"] = terms["loss"] * torch.nan
            return terms

        loop.training_losses = nan_losses


if __name__ == "__main__":
    sys.path.insert(0, str(HOOKS.parents[1]))
    _install(os.environ)
    from hf_ddpm.training.main import main

    sys.exit(main(sys.argv[1:]))
