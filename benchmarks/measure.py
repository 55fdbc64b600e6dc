"""How the benchmarks measure and record: candidates side by side in interleaved rounds, medians and paired ratios,
the machine the numbers were taken on, and the JSON file each benchmark leaves in benchmarks/results/.

Every comparison runs its candidates side by side in one process: warm each up, then repeat rounds in which every
candidate runs once, the order rotated each round, so that a change in the machine's load lands on all of them.
Ratios are the median of the per-round ratios (paired), which a slow drift of the load cancels out of.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import torch

from hf_ddpm.atomic import write_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# ---------------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call of `fn` (GPU work included)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


CLOCKS = ("wall", "cpu")
"""wall: elapsed time, what a user waits for. cpu: this process's CPU time, which other processes on a busy
machine barely change (with one torch thread it is the compute itself): the cross-check, and the clock the
verdicts use when the machine was loaded (see `primary_clock`)."""


def rotations(names: list, rounds: int) -> Iterator[tuple[int, list]]:
    """(r, the names in round r's order) for each round: round r starts from the r-th name (rotated order), so each
    one runs first, last and in between equally often. Every interleaved measurement here takes its order from it."""
    for r in range(rounds):
        yield r, names[r % len(names) :] + names[: r % len(names)]


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    measure: Callable[[Callable[[], object]], tuple[float, float]] = timed,
) -> dict[str, dict[str, list[float]]]:
    """{clock: {candidate: [seconds per round]}}: `measure(candidate)` (by default: wall and CPU seconds of one
    call) of each candidate over `rounds` rotated rounds (`rotations`), after `warmup` untimed calls of each."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {clock: {name: [] for name in names} for clock in CLOCKS}
    for _, order in rotations(names, rounds):
        for name in order:
            for clock, seconds in zip(CLOCKS, measure(candidates[name])):
                times[clock][name].append(seconds)
    return times


def primary_clock(load_before: list[float] | None, load_after: list[float] | None, threshold: float = 1.5) -> str:
    """The clock for the verdicts: wall when the 1-minute load average stayed below `threshold` (this benchmark's
    own thread counts about 1), else cpu: on a loaded machine elapsed times measure the other processes too."""
    loads = [x[0] for x in (load_before, load_after) if x]
    return "wall" if loads and max(loads) < threshold else "cpu"


def summary(seconds: list[float], per: float = 1.0) -> dict:
    """Median, min, max and interquartile range of `seconds`, each divided by `per` (e.g. images x steps)."""
    values = sorted(s / per for s in seconds)
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "iqr": quartiles[2] - quartiles[0],
        "runs": len(values),
    }


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[r] / denominator[r]: a ratio of two candidates timed side by side."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def child_env(**extra: str) -> dict:
    """The environment of a measured child process: one OpenMP thread (DESIGN.md: the safe default beside other
    load), offline, this checkout importable; `extra` on top."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **offline, **extra}


# ---------------------------------------------------------------------------------------------------- the machine


def cpu() -> tuple[str, str]:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what `platform` says) and what sets its kernel speed
    beside the name (which a cloud host may not give): torch's vector dispatch level and whether bf16 is native.
    Without native bf16 (avx512_bf16 or amx_bf16), bf16 arithmetic is emulated and runs many times slower than
    float32, so the bf16 rows of two hosts do not compare."""
    info = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    flags = set(info.get("flags", "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    native = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no native bf16" if flags else "bf16 unknown"
    return model, f"{torch.backends.cpu.get_cpu_capability()}, {native}"


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, threads, library versions, load average, GPU if any."""
    import accelerate
    import diffusers

    model, features = cpu()
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": model,
        "cpu_features": features,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "load_average": load_average(),
        "git_revision": _git_revision(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- the record


def measured(name: str, work: Callable[[], dict], **facts) -> dict:
    """A benchmark's record: `work()`'s result with the benchmark's name, the machine (and `facts` about it), the
    load average before and after, the clock its verdicts use and its wall time. A result may name its clock itself
    (the GPU's is wall time: the host's CPU time says nothing about GPU work)."""
    info = machine() | facts
    started = time.perf_counter()
    result = work()
    info["load_average_after"] = load_average()
    clock = primary_clock(info["load_average"], info["load_average_after"])
    return {"benchmark": name, "machine": info, "clock": clock, "wall_seconds": time.perf_counter() - started, **result}


def write_json(name: str, payload: dict, results_dir: str = RESULTS_DIR) -> str:
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    write_atomically(path, lambda f: f.write(json.dumps(payload, indent=2) + "\n"))
    return path


def read_json(name: str, results_dir: str = RESULTS_DIR) -> dict | None:
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def log(message: str) -> None:
    """Progress on stdout (a run hides stderr: the training loops' progress bars), with the time and the load
    average (benchmarks take minutes)."""
    load = load_average()
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp} load {load[0] if load else '?'}] {message}", flush=True)
