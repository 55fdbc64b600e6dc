"""How many CPU threads each training process uses (`torch.set_num_threads`).

OpenMP threads spin while they wait for each other; on cores that other processes also use, a spinning thread
waits for a descheduled sibling, and a step can take many times longer than with one thread (measured on this
project's 2-core machine under load: see the README, "Training on a busy CPU"). The default therefore leaves the
CPUs this process may run on (its affinity mask, which `taskset`, SLURM's --cpus-per-task and containers set) to
the processes of this machine, and uses ONE thread per process where there are few CPUs to share
(`SMALL_MACHINE_CPUS`), since there a single other busy process already halves every thread's core.
`--num_threads N`, or OMP_NUM_THREADS set by the user or by `accelerate launch --num_cpu_threads_per_process`,
take precedence.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)
SMALL_MACHINE_CPUS = 4  # at most this many usable CPUs: one thread per process


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads per process when neither --num_threads nor OMP_NUM_THREADS says."""
    cpus, local_processes = usable_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cpus <= SMALL_MACHINE_CPUS:
        return 1
    return max(1, cpus // local_processes)


def apply(args) -> int:
    """Set torch's intra-op threads for this process; returns the number."""
    if getattr(args, "num_threads", None) is not None:
        threads, why = args.num_threads, "--num_threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads, why = default_threads(), f"default for {usable_cpus()} usable CPUs"
    torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) per process (%s)", threads, why)
    return threads
