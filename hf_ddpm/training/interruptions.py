"""What interrupts a run, and how it ends: a signal (preemption), a lost stream, a non-finite loss, gradient or
weight. (An error on one process that the others must hear about: hf_ddpm/launch.py's `raise_if_any_failed`.)

Preemption. SIGTERM, SIGINT or SIGUSR1 (what SLURM, Kubernetes, spot instances and Ctrl-C send) ends the run at the
next optimizer-step boundary with a checkpoint of that step, instead of losing every step since the last one. The
handler only sets a flag (in the process that installed it; a forked worker that inherited the handler ignores the
signal). The loop already all-reduces each optimizer step's loss and reads it on the host for its logs; the flag
rides in the same all-reduce as a second element (`reduce_with_loss`), so agreeing costs no extra collective and no
extra host sync. Every process therefore sees the same sum at the same step: a signal to one rank, to all of them or
to the launcher stops all processes at the same step, and they write one checkpoint together. After the checkpoint
the run prints one line naming it and the command that resumes it, and exits with status 128 + the signal number
(143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), as a shell reports a process killed by that signal, so that SLURM
and other schedulers see an interrupted, requeueable job. A second SIGINT while the checkpoint is being written
aborts at once (the default action of SIGINT): the previous checkpoint stays intact.

Before the first step (the run set up, its data cache built) there is no step to checkpoint: a signal ends the
process at once, in one line (`StopAtOnce`).

A signal during the final evaluation (bits/dim, sample grid) stops it: the main process, which alone runs it, is
interrupted at once (`interrupting`), and all processes write the checkpoint of the last step, whose resume only
evaluates and saves. A signal while the pipeline is saved lets the save finish (seconds, atomic) and says so.

A streaming source that vanishes (hf_ddpm.data.StreamSourceError, raised on the process whose part failed) stops
the run the same way: the flag rides in the same all-reduce, every process drops the unfinished optimizer step
and they checkpoint the last one together; the run exits with SOURCE_LOST_STATUS.

Faults. Every decision is taken from values that all processes share (the all-reduced loss, the gradient norm of
the all-reduced gradients, replicated weights), so in DDP all processes stop, or skip, at the same step together.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)

NAN_POLICIES = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 10  # --on_nan skip: a run whose steps keep failing stops instead of idling on
# What a diverging run needs, said where it stops. Not "resume with a lower --learning_rate": a resume restores the
# optimizer and LR schedule, so it keeps the run's peak learning rate (hf_ddpm/training/resolve.py says so).
TAME_THE_STEP = ("start again (--overwrite_output_dir) with a lower --learning_rate or a longer --lr_warmup_steps "
                 "(a resume keeps the run's learning rate)")  # fmt: skip

# ------------------------------------------------------------------------------------------------ preemption


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


# sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry"): the run stopped because its
# streaming source vanished, with a checkpoint; restored, it resumes. Distinct from an error (1) and a signal (128+N).
SOURCE_LOST_STATUS = 75


class SourceLost(SystemExit):
    """Raised by the loop after the checkpoint of the last step, when a streaming source vanished."""

    def __init__(self, checkpoint: str | None, command: str):
        super().__init__(SOURCE_LOST_STATUS)
        self.checkpoint, self.command = checkpoint, command


class Interrupted(BaseException):
    """Raised in the main process by a signal during the final evaluation (`PreemptionHandler.interrupting`).
    A BaseException: no `except Exception` on the way swallows it."""


class SignalHandlers:
    """This process's handlers of `signals`: `install` puts `handler` in place (by default the subclass's `_handle`),
    `restore` puts back what was there before (once; later calls do nothing)."""

    def __init__(self, signals=()):
        self.signals = tuple(signals)
        self._owner = os.getpid()  # a forked process that inherits a handler is not this one
        self._previous: dict = {}

    def install(self, handler=None) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle if handler is None else handler)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class PreemptionHandler(SignalHandlers):
    """Installs the handlers (`install`), carries the flag into the loss all-reduce, restores them (`restore`)."""

    def __init__(self, signals=(), speaks: bool = True):
        super().__init__(signals)
        self.speaks = speaks  # whether this process says what a signal does (one process of a run does)
        self.received: int | None = None  # the first signal caught in this process
        self.agreed: int | None = None  # the signal all processes agreed to stop on (0: on another process)
        self.source_error = None  # this process's StreamSourceError, if its part of the stream failed
        self.phase = "train"  # or "evaluate", "save", "push" (the end of the run): what a signal does, and says
        self._interrupt = False  # within `interrupting`: a signal raises Interrupted

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
            doing = {
                "train": "stopping after this optimizer step with a checkpoint",
                "evaluate": "stopping the final evaluation; writing the checkpoint of the last step",
                "save": "finishing the save of the pipeline (seconds), then stopping",
                "push": "stopping the push (the pipeline is saved; the command that pushes it follows)",
            }[self.phase]
            if self.speaks:  # one line for the run, on a line of its own (the progress bar may hold the last)
                again = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
                print(f"\nreceived {name}: {doing}{again}", file=sys.stderr, flush=True)
        if self._interrupt:
            self._interrupt = False  # raised once: the checkpoint that follows is not interrupted
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interrupting(self):
        """Within the block a signal (caught before it, or during it) raises Interrupted in this process."""
        if self.received is not None:
            raise Interrupted(self.received)
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def reduce_with_loss(self, accelerator, loss):
        """All-reduce (mean) `loss` together with this process's signal number (0 if none) and whether its stream
        failed: one collective. Returns the mean loss, a tensor (nothing is read on the host here)."""
        flags = [float(self.received or 0), float(self.source_error is not None)]
        flags = torch.tensor(flags, device=loss.device, dtype=loss.dtype)
        self._reduced = accelerator.reduce(torch.cat([loss[None], flags]), "sum")
        return self._reduced[0] / accelerator.num_processes

    def source_lost(self) -> bool:
        """Whether any process's stream failed in this optimizer step (a host read: the loop asks only when
        streaming, before the optimizer step). The same answer on every process."""
        return self._reduced[2].item() > 0

    def read(self, num_processes: int) -> tuple[float, bool]:
        """(the mean loss, whether any process caught a signal) in one host read, where the loop reads the loss for
        its logs anyway. The same answer on every process."""
        loss, signals, _ = (self._reduced / num_processes).tolist()  # the loss exactly as the tensor mean
        if signals > 0 and self.agreed is None:
            total = round(signals * num_processes)  # one signalled process: its signal; several: SIGTERM
            elsewhere = total if total in signal.valid_signals() else int(signal.SIGTERM)
            self.agreed = self.received or elsewhere
        return loss, self.agreed is not None


class StopAtOnce(SignalHandlers):
    """The signals of preemption before the loop's PreemptionHandler takes them (a context manager): while the
    run is set up and its data cache built. Nothing is trained yet, so there is no step to checkpoint, and a cache
    build cannot stop halfway cleanly (its worker pool dies with tracebacks, or hangs). A signal ends the process at
    once: one line (the process that `speaks`), then the `cleanups` registered so far (the output directory's lock,
    and the directory itself when the run made it), exit status 128 + N. The pool's workers die with the process
    (hf_ddpm/data/workers.py); a forked process that inherited the handler ignores the signal."""

    def __init__(self, signals=(), speaks: bool = True):
        super().__init__(signals)
        self.speaks = speaks
        self.cleanups: list = []

    def hand_over(self, handler: PreemptionHandler) -> None:
        """Let the loop's `handler` take the signals, with no moment between: its `restore` puts back what was there
        before this (so a signal at the run's end is never taken for one before its first step)."""
        handler.install()
        handler._previous, self._previous = self._previous, {}

    def __enter__(self) -> StopAtOnce:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:
            return
        if self.speaks:  # os.write: the main thread may be inside a print (a progress bar's) that this interrupts
            os.write(2, f"\nreceived {signal.Signals(signum).name} before the first training step: stopped, nothing "
                        "trained or written; the same command starts again\n".encode())  # fmt: skip
        for cleanup in self.cleanups:
            with contextlib.suppress(Exception):
                cleanup()
        os._exit(exit_status(signum))


# ------------------------------------------------------------------------------------------------ faults

# What gloo says when the process at the other end of a collective is gone (killed: the OOM killer, a node lost).
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


class PeerLost(RuntimeError):
    """A collective failed because another process of the run ended (`lost`: the error, if it says so; else None).
    Nothing of the step in progress is written; the run resumes from its last checkpoint."""

    @classmethod
    def lost(cls, error: BaseException, num_processes: int, last_checkpoint: str | None, command: str):
        if num_processes < 2 or not isinstance(error, RuntimeError) or not any(s in str(error) for s in PEER_GONE):
            return None
        said = next(s for s in PEER_GONE if s in str(error))
        kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        return cls(
            f"another process of this run ended while this one trained (a collective with it failed: {said}); "
            f"nothing of the step in progress was written and {kept}. Resume with: {command} (the launcher's report "
            "names the process that ended and its exit status)"
        )


class NonFiniteError(FloatingPointError):
    """Training stopped at a non-finite loss, gradient or weight; nothing from that step was written."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined), else its type."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def require_finite_weights(model, ema, step: int, target: str) -> None:
    """Raise NonFiniteError, before anything is written, when the weights (or their EMA) that `target` would hold
    are not finite: a checkpoint or pipeline with NaN weights is never written. One host sync for all of them."""
    named = list(model.named_parameters())
    if ema is not None:
        named += [(f"ema:{name}", shadow) for (name, _), shadow in zip(named, ema.shadow_params)]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist() if named else []
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:4]) + (f", ... ({len(bad)} tensors)" if len(bad) > 4 else "")
        raise NonFiniteError(
            f"step {step}: the weights hold NaN or inf ({shown}); not writing {target}. To go on, {TAME_THE_STEP}"
        )


class NanGuard:
    """--on_nan: `stop` (the default) raises NonFiniteError at the first optimizer step whose loss or gradient norm
    is NaN or inf, before that step writes a checkpoint or pipeline; `skip` drops the update of such a step (the
    optimizer and the EMA keep their state; the data position and the LR schedule move on) and warns, and still
    stops after MAX_CONSECUTIVE_SKIPS such steps in a row.

    `stop` costs nothing: it reads the loss and gradient norm that the loop logs anyway, after the step (the
    weights it updated are then never written). `skip` must decide before the optimizer step: one more host sync.
    With an fp16 gradient scaler an inf gradient norm is the scaler's business (it skips the step and lowers its
    scale), so only the loss is checked then.
    """

    def __init__(self, policy: str, last_checkpoint, grad_scaler: bool = False):
        """last_checkpoint: () -> the newest checkpoint's path or None, for the message."""
        self.policy, self.last_checkpoint, self.grad_scaler = policy, last_checkpoint, grad_scaler
        self.skipped: list[int] = []
        self.consecutive = 0

    def finite(self, loss, grad_norm) -> bool:
        values = (loss,) if self.grad_scaler else (loss, grad_norm)
        return all(math.isfinite(float(v)) for v in values)

    def apply_update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Before `optimizer.step()`: whether to take it (always under `stop`, without looking)."""
        return self.policy != "skip" or self.finite(loss, grad_norm)

    def after_step(self, step: int, loss: float, grad_norm: float) -> None:
        """After the step's logs, before its checkpoint: stop (raise) or count a skipped step."""
        if self.finite(loss, grad_norm):
            self.consecutive = 0
            return
        what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
        latest = self.last_checkpoint()
        kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint had been written yet"
        advice = f"{TAME_THE_STEP}, or check the data"
        if self.policy == "stop":
            raise NonFiniteError(
                f"{what}; training stopped (--on_nan stop) and wrote nothing of this step: {kept}. "
                f"To go on, {advice}; or resume with --on_nan skip to skip such steps"
            )
        self.skipped.append(step)
        self.consecutive += 1
        logger.warning("%s: skipped its update (--on_nan skip; %d skipped so far)", what, len(self.skipped))
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(
                f"{what}, the {self.consecutive}th non-finite step in a row; training stopped: {kept}. To go on, {advice}"
            )
