"""Timing helpers shared by the benchmarks: the machine's description, interleaved repeats, medians, paired ratios.

Every comparison runs its candidates side by side in one process: warm each up, then repeat rounds in which every
candidate runs once, the order rotated each round, so that a change in the machine's load lands on all of them.
Ratios are the median of the per-round ratios (paired), which a slow drift of the load cancels out of.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TRAINING_FLOOR = "floor: the UNet step alone (fp32)"  # the training benchmark's row with nothing but the model's work
# the schedulers benchmark's target: a diffusers scheduler at <= 25 model evaluations within 10% of the 1000-step
# ancestral FID
FAST_EVALUATIONS, FAST_FID_RATIO = 25, 0.10


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, threads, library versions, load average, GPU if any."""
    import accelerate
    import diffusers

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
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


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call of `fn` (GPU work included)."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


CLOCKS = ("wall", "cpu")
"""wall: elapsed time, what a user waits for. cpu: this process's CPU time, which other processes on a busy
machine barely change (with one torch thread it is the compute itself): the cross-check, and the clock the
verdicts use when the machine was loaded (see `primary_clock`)."""


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    measure: Callable[[Callable[[], object]], tuple[float, float]] = timed,
) -> dict[str, dict[str, list[float]]]:
    """{clock: {candidate: [seconds per round]}}: `measure(candidate)` (by default: wall and CPU seconds of one
    call) of each candidate over `rounds` rounds, after `warmup` untimed calls of each.

    Round r runs every candidate once, starting from the r-th (rotated order), so each one runs first, last and in
    between equally often.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
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


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None keeps torch's default); returns the number in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def write_json(name: str, payload: dict, results_dir: str = RESULTS_DIR) -> str:
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path


def read_json(name: str, results_dir: str = RESULTS_DIR) -> dict | None:
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def log(message: str) -> None:
    """Progress on stderr, with the time and the load average (benchmarks take minutes)."""
    load = load_average()
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp} load {load[0] if load else '?'}] {message}", flush=True)


US = 1e6  # seconds → microseconds


def sampling_cases(s: dict) -> list[tuple[str, dict]]:
    """(model, comparison) of each sampling case in a sampling result, the large model's last."""
    return [(s["model"], c) for c in s["comparisons"]] + (
        [(s["large_model"]["model"], s["large_model"])] if s.get("large_model") else []
    )


# RESULTS.md formatting, shared by benchmarks/report.py and the benchmarks that render their own section


def table(headers: list[str], rows: list[list], numeric: bool = False) -> str:
    """A Markdown table; `numeric`: the columns after the first right-aligned."""
    rule = ["---"] + ["---:" if numeric else "---"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def other(clock: str) -> str:
    return "cpu" if clock == "wall" else "wall"


def machine_line(r: dict) -> str:
    m = r["machine"]
    load, after = (m.get(k) or ["?"] for k in ("load_average", "load_average_after"))
    return (
        f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch thread(s); torch {m['torch']}, diffusers "
        f"{m['diffusers']}, accelerate {m['accelerate']}; {m['date_utc']} UTC, revision {m['git_revision']}; "
        f"load average (1 min) {load[0]} before, {after[0]} after; profile `{r['profile']}`, "
        f"{r['wall_seconds'] / 60:.1f} min"
    )


def clock_note(r: dict) -> str:
    if r["clock"] == "wall":
        return "Verdicts and tables use wall-clock time (the machine was quiet); CPU-time ratios are the cross-check."
    return (
        "**The machine was loaded** (1-minute load average ≥ 1.5 before or after this benchmark, see above): tables "
        "and verdicts use this process's CPU time, which other processes barely change; wall-clock ratios are shown "
        "for comparison."
    )


def heading(title: str, r: dict, clocked: bool = True) -> list[str]:
    return [f"## {title}", "", machine_line(r), ""] + ([clock_note(r), ""] if clocked else [])
