"""The CPU floor under each allocator: glibc's defaults, glibc tuned by `mallopt` at start-up (hf_ddpm.cpu, what
the package's programs do), jemalloc and tcmalloc preloaded (how `torch.backends.xeon.run_cpu` tunes inference).

Every (allocator, workload) pair runs in a fresh process with one thread (allocator settings are process-wide):
one warm-up, then repetitions measured with getrusage (CPU, system time, minor page faults) and the wall clock;
the process's peak RSS at its end. Rounds repeat every pair with the allocators' order rotated, so the machine's
load lands on all of them; wall-time ratios are paired within a round. The workloads are the no-grad UNet work a
CPU user waits for (sampling at three batch sizes, the exact bound, the Inception features of FID) and a training
step, on digits-16-tiny (untrained weights: the allocator's work does not depend on them). End to end:
`python -m hf_ddpm evaluate` (Monte Carlo bits/dim) and `examples/generate.py` as a user runs them, with and without
the tuning (a user's MALLOC_* variable switches it off: MALLOC_PERTURB_=0 is glibc's own default).

    python -m benchmarks.run --only allocator [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from .measure import ROOT, child_env, log, paired_ratio, rotations

LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
PRELOADS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}  # Debian: libjemalloc2, ...
ALLOCATORS = ("glibc default", "glibc mallopt (hf_ddpm.cpu)", "jemalloc", "tcmalloc")
ADOPTED = "glibc mallopt (hf_ddpm.cpu)"
USER_CHOICE = {"MALLOC_PERTURB_": "0"}  # a no-op setting that makes hf_ddpm.cpu leave glibc at its defaults
PROFILES = {  # workload -> batch, model calls (sampling steps, bound terms, training steps); reps; rounds
    "smoke": {"work": {"sampling": (4, 2)}, "reps": 1, "rounds": 1, "end_to_end": False},
    "quick": {"work": {"sampling": (16, 20), "sampling-64": (64, 10), "sampling-256": (256, 4),
                       "exact bound": (32, 20), "FID features": (8, 1), "training": (64, 3)},
              "reps": 3, "rounds": 2, "end_to_end": True},
    "full": {"work": {"sampling": (16, 40), "sampling-64": (64, 20), "sampling-256": (256, 8),
                      "exact bound": (64, 50), "FID features": (16, 1), "training": (64, 5)},
             "reps": 5, "rounds": 3, "end_to_end": True},
}  # fmt: skip
COUNTERS = ("wall", "cpu", "system", "faults")


def preload(allocator: str) -> str | None:
    """The path of a preloadable allocator library, None where it is not installed."""
    name = PRELOADS[allocator]
    return next((os.path.join(d, name) for d in LIBDIRS if os.path.exists(os.path.join(d, name))), None)


def allocator_env(allocator: str) -> dict:
    """A measured child's environment (`child_env`) with `allocator` in place of whatever this process was given."""
    env = {k: v for k, v in child_env().items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    if allocator in PRELOADS:
        env["LD_PRELOAD"] = preload(allocator)
    elif allocator == "glibc default":
        env.update(USER_CHOICE)
    return env


def workload(name: str, batch: int, calls: int):
    """A callable doing one repetition of `name` (built here, outside the measurement)."""
    import torch

    from .models import untrained_pipeline, untrained_unet

    if name == "training":
        unet = untrained_unet("digits-16-tiny")
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        x, t = torch.randn(batch, 1, 16, 16), torch.randint(0, 1000, (batch,))

        def step():
            for _ in range(calls):
                loss = torch.nn.functional.mse_loss(unet(x, t).sample, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step
    pipe = untrained_pipeline(calls if "bound" in name else 1000)
    if name == "exact bound":  # T = `calls` terms, each one UNet pass over the batch
        images = torch.randint(0, 256, (batch, 1, 16, 16), dtype=torch.uint8)
        return lambda: pipe.bits_per_dim(images, batch_size=batch, generator=torch.Generator().manual_seed(0))
    if name == "FID features":  # Inception-v3 pool3 features of the samples, at 299x299
        from hf_ddpm.evaluation.features import InceptionFeatures

        extractor = InceptionFeatures("cpu", batch_size=batch)
        images = torch.randint(0, 256, (batch, 1, 16, 16), dtype=torch.uint8)
        return lambda: extractor(images)
    generator = torch.Generator().manual_seed(0)
    return lambda: pipe(batch_size=batch, generator=generator, num_inference_steps=calls, output_type="np")


def child(name: str, batch: int, calls: int, reps: int, tune: bool) -> dict:
    """Runs in the measured process: the tuning the package's programs apply, a warm-up, then `reps` repetitions."""
    import torch

    torch.set_num_threads(1)
    if tune:
        from hf_ddpm.cpu import tune_allocator

        tune_allocator()
    run = workload(name, batch, calls)
    run()
    measured = {counter: [] for counter in COUNTERS}
    for _ in range(reps):
        before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        measured["wall"].append(time.perf_counter() - wall)
        measured["cpu"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        measured["system"].append(after.ru_stime - before.ru_stime)
        measured["faults"].append(after.ru_minflt - before.ru_minflt)
    return {k: statistics.median(v) for k, v in measured.items()} | {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def measure(allocator: str, name: str, batch: int, calls: int, reps: int) -> dict:
    argv = [sys.executable, "-m", "benchmarks.allocator", name, str(batch), str(calls), str(reps), allocator]
    done = subprocess.run(argv, env=allocator_env(allocator), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{allocator} / {name} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def end_to_end(allocator: str, command: list[str], out: str) -> dict:
    """One run of a user's command: wall, CPU, system time, faults and peak RSS of that process (its own rusage)."""
    wall = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, env=allocator_env(allocator), cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {stderr.read()[-2000:].decode(errors='replace')}")
    return {"wall": time.perf_counter() - wall, "cpu": usage.ru_utime + usage.ru_stime, "system": usage.ru_stime,
            "faults": usage.ru_minflt, "peak_rss_mb": usage.ru_maxrss / 1024, "output": printed_result(stdout, out)}  # fmt: skip


def printed_result(stdout: str, out: str) -> str:
    """What a run computed: the bits/dim line evaluate prints, or the hash of the grid generate writes."""
    lines = [line for line in stdout.splitlines() if line.startswith("bits/dim")]
    if lines:
        return lines[-1]
    with open(os.path.join(out, "grid.png"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def medians(runs: dict) -> dict:
    """{allocator: {case: [per-round dicts]}} -> {case: {allocator: medians, wall ratio to glibc's default}}."""
    table = {}
    for allocator, cases in runs.items():
        for case, rounds in cases.items():
            row = {k: statistics.median(r[k] for r in rounds) for k in (*COUNTERS, "peak_rss_mb")}
            base = runs[ALLOCATORS[0]][case]
            row["wall_ratio"] = paired_ratio([b["wall"] for b in base], [r["wall"] for r in rounds])
            table.setdefault(case, {})[allocator] = row
    return table


def run(profile: str) -> dict:
    p = PROFILES[profile]
    allocators = [a for a in ALLOCATORS if a not in PRELOADS or preload(a)]
    if profile == "smoke":
        allocators = allocators[:2]
    runs = {a: {} for a in allocators}
    for r, order in rotations(allocators, p["rounds"]):
        for allocator in order:
            for name, (batch, calls) in p["work"].items():
                log(f"allocator round {r + 1}: {allocator}, {name}")
                runs[allocator].setdefault(name, []).append(measure(allocator, name, batch, calls, p["reps"]))
    result = {"profile": profile, "allocators": allocators, "missing": [a for a in ALLOCATORS if a not in allocators],
              "work": p["work"], "reps": p["reps"], "rounds": p["rounds"], "workloads": medians(runs)}  # fmt: skip
    if p["end_to_end"]:
        result["end_to_end"] = run_end_to_end(p["rounds"])
    return result


def run_end_to_end(rounds: int) -> dict:
    from .models import untrained_pipeline

    with tempfile.TemporaryDirectory(prefix="hf_ddpm_bench_alloc_") as tmp:
        model = os.path.join(tmp, "pipeline")
        untrained_pipeline(1000).save_pretrained(model)
        commands = {
            "python -m hf_ddpm evaluate (Monte Carlo K = 64, 64 digits, batch 64)": [sys.executable, "-m", "hf_ddpm",
                "evaluate", model, "--num_images", "64", "--num_timesteps", "64", "--batch_size", "64"],
            "examples/generate.py (64 images, 50 steps)": [sys.executable, os.path.join(ROOT, "examples", "generate.py"),
                model, "--num_images", "64", "--steps", "50", "--out", os.path.join(tmp, "grid.png")],
        }  # fmt: skip
        pair = [ALLOCATORS[0], ADOPTED]
        runs = {a: {} for a in pair}
        for r, order in rotations(pair, rounds):
            for allocator in order:
                for name, command in commands.items():
                    log(f"allocator end to end, round {r + 1}: {allocator}, {name.split(' (')[0]}")
                    runs[allocator].setdefault(name, []).append(end_to_end(allocator, command, tmp))
    # what each run computed, the same under both: bits/dim to the last printed digit, the grid's bytes
    same = {name: len({run["output"] for a in pair for run in runs[a][name]}) == 1 for name in commands}
    return {"commands": medians(runs), "identical_output": same}


if __name__ == "__main__":
    name, batch, calls, reps, allocator = sys.argv[1:6]
    print(json.dumps(child(name, int(batch), int(calls), int(reps), tune=allocator == ADOPTED)))
