"""What a run does when something goes wrong: a non-finite loss or gradient (--on_nan), weights that are not finite
when they are about to be written, and an error on one process that the other processes must hear about.

Every decision here is taken from values that all processes share (the all-reduced loss, the gradient norm of the
all-reduced gradients, replicated weights), so in DDP all processes stop, or skip, at the same step together.
"""

from __future__ import annotations

import math

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)

NAN_POLICIES = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 10  # --on_nan skip: a run whose steps keep failing stops instead of idling on


class NonFiniteError(FloatingPointError):
    """Training stopped at a non-finite loss, gradient or weight; nothing from that step was written."""


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
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return accelerator.reduce(flag, "sum").item() > 0  # other backends (XLA)
    work = torch.distributed.all_reduce(flag, async_op=True)  # SUM
    work.wait()
    _DONE_WORK.append(work)
    return flag.item() > 0


def describe(error: BaseException) -> str:
    """An error in a few words for a message: an OSError's reason and path, else its type and text (a full disk
    makes torch.save raise RuntimeError and safetensors SafetensorError, not OSError)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    return f"{type(error).__name__}: {error}"


def nonfinite_names(named_tensors) -> list[str]:
    """Names of the tensors holding NaN or ±inf (one host sync for all of them)."""
    named = list(named_tensors)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def require_finite_weights(model, ema, step: int, target: str) -> None:
    """Raise NonFiniteError, before anything is written, when the weights (or their EMA) that `target` would hold
    are not finite: a checkpoint or pipeline with NaN weights is never written."""
    bad = nonfinite_names(model.named_parameters())
    if ema is not None:
        names = [name for name, _ in model.named_parameters()]
        bad += [f"ema:{name}" for name in nonfinite_names(zip(names, ema.shadow_params))]
    if bad:
        shown = ", ".join(bad[:4]) + (f", ... ({len(bad)} tensors)" if len(bad) > 4 else "")
        raise NonFiniteError(
            f"step {step}: the weights hold NaN or inf ({shown}); not writing {target}. "
            "Lower --learning_rate (or lengthen --lr_warmup_steps) and resume from the last checkpoint"
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

    def __init__(self, policy: str, output_dir: str, grad_scaler: bool = False):
        if policy not in NAN_POLICIES:
            raise ValueError(f"--on_nan {policy!r} is not supported; choose one of {', '.join(NAN_POLICIES)}")
        self.policy, self.output_dir, self.grad_scaler = policy, output_dir, grad_scaler
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
        from .checkpoints import latest_checkpoint  # checkpoints imports this module

        what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
        latest = latest_checkpoint(self.output_dir)
        kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint had been written yet"
        advice = "lower --learning_rate (or lengthen --lr_warmup_steps) or check the data"
        if self.policy == "stop":
            raise NonFiniteError(
                f"{what}; training stopped (--on_nan stop) and wrote nothing of this step: {kept}. "
                f"To go on, {advice} and resume, or pass --on_nan skip to skip such steps"
            )
        self.skipped.append(step)
        self.consecutive += 1
        logger.warning("%s: skipped its update (--on_nan skip; %d skipped so far)", what, len(self.skipped))
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(
                f"{what}, the {self.consecutive}th non-finite step in a row; training stopped: {kept}. {advice}"
            )
