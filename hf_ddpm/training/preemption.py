"""Preemption: SIGTERM, SIGINT or SIGUSR1 (what SLURM, Kubernetes, spot instances and Ctrl-C send) ends the run at
the next optimizer-step boundary with a checkpoint of that step, instead of losing every step since the last one.

How the processes agree. The handler only sets a flag (in the process that installed it; a forked DataLoader
worker inherits the handler and ignores the signal, see `ignore_in_worker`). The loop already all-reduces each
optimizer step's loss and reads it on the host for its logs; the flag rides in the same all-reduce as a second
element (`reduce_with_loss`), so agreeing costs no extra collective and no extra host sync. Every process therefore
sees the same sum at the same step: a signal to one rank, to all of them or to the launcher stops all processes at
the same step, and they write one checkpoint together.

After the checkpoint the run prints one line naming it and the command that resumes it, and exits with status
128 + the signal number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), as a shell reports a process killed by
that signal, so that SLURM and other schedulers see an interrupted, requeueable job. A second SIGINT while the
checkpoint is being written aborts at once (the default action of SIGINT): the previous checkpoint stays intact.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

DEFAULT_SIGNALS = "TERM,INT,USR1"


def parse_signals(value: str) -> tuple[signal.Signals, ...]:
    """'TERM,INT,USR1' (names with or without SIG, case-insensitive) -> signals; 'none' -> ()."""
    if value.strip().lower() in ("", "none"):
        return ()
    found = []
    for name in value.split(","):
        key = name.strip().upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if key in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, key):
            raise ValueError(
                f"--preemption_signals {value!r}: {name.strip()!r} is not a signal a process can catch; "
                "use names such as TERM,INT,USR1,USR2,HUP, or none"
            )
        found.append(signal.Signals[key])
    return tuple(dict.fromkeys(found))


def exit_status(signum: int) -> int:
    """The documented exit status of a preempted run: 128 + the signal number."""
    return 128 + int(signum)


class Preempted(SystemExit):
    """Raised by the loop after the preemption checkpoint is written; its `code` is the exit status."""

    def __init__(self, signum: int, checkpoint: str, command: str):
        super().__init__(exit_status(signum))
        self.signum, self.checkpoint, self.command = signum, checkpoint, command


class PreemptionHandler:
    """Installs the handlers (`install`), carries the flag into the loss all-reduce, restores them (`restore`)."""

    def __init__(self, signals=()):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal caught in this process
        self.agreed: int | None = None  # the signal all processes agreed to stop on (0: on another process)
        self._owner = os.getpid()
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:  # a forked worker inherited the handler: the main process decides
            return
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: abort now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            print(
                f"received {name}: stopping after this optimizer step with a checkpoint"
                + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )

    def reduce_with_loss(self, accelerator, loss):
        """All-reduce (mean) `loss` together with this process's signal number (0 if none): one collective.
        Returns the mean loss, a tensor (nothing is read on the host here)."""
        import torch  # here: the signal handling above needs no torch (a DataLoader worker may import this module)

        flag = torch.tensor(float(self.received or 0), device=loss.device, dtype=loss.dtype)
        self._reduced = accelerator.reduce(torch.stack([loss, flag]), "sum")
        return self._reduced[0] / accelerator.num_processes

    def read(self, num_processes: int) -> tuple[float, bool]:
        """(the mean loss, whether any process caught a signal) in one host read, where the loop reads the loss for
        its logs anyway. The same answer on every process."""
        loss, signals = (self._reduced / num_processes).tolist()  # the loss exactly as the tensor mean
        if signals > 0 and self.agreed is None:
            total = round(signals * num_processes)  # one signalled process: its signal; several: SIGTERM
            elsewhere = total if total in signal.valid_signals() else int(signal.SIGTERM)
            self.agreed = self.received or elsewhere
        return loss, self.agreed is not None


def ignore_in_worker(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: workers ignore the preemption signals (a Ctrl-C reaches the whole process
    group); the main process stops them at the step boundary."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


LAUNCH_FLAGS = ("--resume_from_checkpoint", "--overwrite_output_dir")


def resume_command(argv: list[str], num_processes: int, mixed_precision: str) -> str:
    """The command that resumes this run: the same options with `--resume_from_checkpoint latest`, under
    `accelerate launch` with the same process count and precision when the run was launched by it."""
    options, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = arg == "--resume_from_checkpoint"
            continue
        if arg.startswith("--resume_from_checkpoint="):
            continue
        options.append(arg)
    script = [sys.argv[0] if sys.argv and sys.argv[0] else "training/train.py"]
    module = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    if os.path.abspath(script[0]) == module:  # started as `-m hf_ddpm.train` (an installed wheel)
        script = ["-m", "hf_ddpm.train"]
    if "ACCELERATE_MIXED_PRECISION" in os.environ or num_processes > 1:  # started by `accelerate launch`
        processes = ["--multi_gpu"] if num_processes > 1 else []
        prefix = ["accelerate", "launch", *processes, "--num_processes", str(num_processes)]
        prefix += ["--mixed_precision", mixed_precision]
    else:
        prefix = ["python"]
    return shlex.join([*prefix, *script, *options, "--resume_from_checkpoint", "latest"])
