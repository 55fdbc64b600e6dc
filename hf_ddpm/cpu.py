"""Tuning a CPU process for UNet work: how many threads it uses, and how glibc's allocator keeps its memory.

Importing hf_ddpm changes nothing process-wide. The programs the package owns (`python -m hf_ddpm ...`, the
training script on every rank, the examples, the Space) call `tune_process` once at start-up; a library user who
wants the same calls it too:

    from hf_ddpm.cpu import tune_process
    tune_process()            # or tune_process(num_threads=4)

Threads. OpenMP threads spin while they wait for each other; on cores that other processes also use, a spinning
thread waits for a descheduled sibling, and a step can take many times longer than with one thread (README,
"Training on a busy CPU": measured on this project's busy 2-core machine). The default therefore leaves
the CPUs this process may run on (its affinity mask, which `taskset`, SLURM's --cpus-per-task and containers set)
to the processes of this machine, and uses ONE thread per process where there are few CPUs to share
(`SMALL_MACHINE_CPUS`), since there a single other busy process already halves every thread's core. An explicit
`num_threads` (`--num_threads`), or OMP_NUM_THREADS set by the user or by `accelerate launch
--num_cpu_threads_per_process`, takes precedence.

Allocator. glibc serves each large buffer (a UNet activation) with a fresh `mmap` and unmaps it on free, and trims
the heap's free top back to the kernel, so every no-grad UNet call faults its activations in again: at batch 64 a
fifth of the CPU time of sampling went to the kernel (benchmarks/results/RESULTS.md, "Allocator: the CPU floor").
`mallopt` at start-up raises the mmap threshold to glibc's maximum (32 MiB; larger buffers, such as Inception's at
299x299, are still mapped afresh) and the trim threshold above it, so freed activations stay mapped and are reused:
no faults, the same numbers bit for bit. The cost: freed memory up to the trim threshold stays resident until it is
reused or the process ends (peak RSS measured within 2% of glibc's defaults). Of glibc's defaults, this, and
jemalloc or tcmalloc preloaded (the way `torch.backends.xeon.run_cpu` tunes CPU inference), it used the least CPU
time on every no-grad workload measured, and it needs no library. A user's own choice wins: any MALLOC_* variable,
glibc.malloc tunables in GLIBC_TUNABLES, or an LD_PRELOAD (jemalloc, tcmalloc) leaves the allocator alone, and so
does any C library other than glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)
SMALL_MACHINE_CPUS = 4  # at most this many usable CPUs: one thread per process

# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
# free heap top kept mapped before glibc returns it: above the mmap threshold (so a freed largest buffer is never
# given back at once), large enough for a sampling batch's activations (benchmarks/allocator.py measures the cost)
TRIM_THRESHOLD = 1024 * 1024 * 1024


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads per process when neither `num_threads` nor OMP_NUM_THREADS says."""
    cpus, local_processes = usable_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cpus <= SMALL_MACHINE_CPUS:
        return 1
    return max(1, cpus // local_processes)


def set_threads(num_threads: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; returns the number and why it was chosen."""
    import torch

    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"--num_threads must be at least 1, got {num_threads}")
        threads, why = num_threads, "--num_threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads, why = default_threads(), f"default for {usable_cpus()} usable CPUs"
    torch.set_num_threads(threads)
    return threads, why


def user_allocator_choice(environ=None) -> str | None:
    """The user's own allocator setting, if any: a MALLOC_* variable, glibc.malloc tunables or an LD_PRELOAD."""
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if name.startswith("MALLOC_"):
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if environ.get("LD_PRELOAD", "").strip():
        return "LD_PRELOAD"
    return None


def glibc_version() -> str | None:
    """'2.36' under glibc; None under any other C library (musl, macOS, Windows)."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # e.g. "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[1] if name and name.startswith("glibc ") else None


def tune_allocator() -> str:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring); returns what was done."""
    choice = user_allocator_choice()
    if choice is not None:
        return f"allocator left to the user's {choice}"
    version = glibc_version()
    if version is None:
        return "allocator left alone (the C library is not glibc)"
    libc = ctypes.CDLL(None)
    # the mmap threshold first: glibc's dynamic threshold stops adjusting once either is set explicitly
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return f"allocator left alone (glibc {version} refused mallopt)"
    return (
        f"glibc {version} malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    )


@dataclass(frozen=True)
class CPUTuning:
    """What `tune_process` did: threads per process (and why) and the allocator's settings."""

    threads: int
    threads_reason: str
    allocator: str

    def __str__(self) -> str:
        return f"{self.threads} CPU thread(s) per process ({self.threads_reason}); {self.allocator}"


def tune_process(num_threads: int | None = None) -> CPUTuning:
    """Tune this process for UNet work on a CPU: threads (`set_threads`) and glibc's allocator (`tune_allocator`).
    Call once at start-up, before the first large tensor; programs the package owns already do."""
    tuning = CPUTuning(*set_threads(num_threads), tune_allocator())
    logger.info("%s", tuning)
    return tuning
