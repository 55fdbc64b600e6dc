"""RESULTS.md (Markdown tables) and PNG plots from the JSON files in benchmarks/results/.

python -m benchmarks.report [RESULTS_DIR]
"""

from __future__ import annotations

import importlib.util
import os
import sys

from .common import RESULTS_DIR, read_json

US = 1e6  # seconds → microseconds


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def machine_line(result: dict) -> str:
    m = result["machine"]
    load = m.get("load_average") or ["?"]
    after = m.get("load_average_after") or ["?"]
    return (
        f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch thread(s); torch {m['torch']}, diffusers "
        f"{m['diffusers']}, accelerate {m['accelerate']}; {m['date_utc']} UTC, revision {m['git_revision']}; "
        f"load average (1 min) {load[0]} before, {after[0]} after; profile `{result['profile']}`, "
        f"{result['wall_seconds'] / 60:.1f} min"
    )


# ---------------------------------------------------------------------------------------------------- clocks


def other(clock: str) -> str:
    return "cpu" if clock == "wall" else "wall"


def clock_note(result: dict) -> str:
    clock = result["clock"]
    if clock == "wall":
        return "Verdicts and tables use wall-clock time (the machine was quiet); CPU-time ratios are the cross-check."
    return (
        "**The machine was loaded** (1-minute load average ≥ 1.5 before or after this benchmark, see above): tables "
        "and verdicts use this process's CPU time, which other processes barely change; wall-clock ratios are shown "
        "for comparison."
    )


# ---------------------------------------------------------------------------------------------------- sampling


def sampling_cases(s: dict) -> list[tuple[str, dict]]:
    cases = [(s["model"], c) for c in s["comparisons"]]
    if s.get("large_model"):
        cases.append((s["large_model"]["model"], s["large_model"]))
    return cases


def sampling_rows(s: dict) -> list[list]:
    clock, rows = s["clock"], []
    for model, c in sampling_cases(s):
        m, x = c[clock], c[other(clock)]
        per = m["seconds_per_image_step"]
        rows.append(
            [
                model, c["batch"], c["steps"],
                f"{per['unet_floor']['median'] * US:.0f}", f"{per['hf_ddpm']['median'] * US:.0f}",
                f"{per['diffusers']['median'] * US:.0f}", pct(m["overhead_over_floor"]),
                pct(m["diffusers_overhead_over_floor"]), f"{m['speedup_vs_diffusers']:.3f}x",
                f"{pct(x['overhead_over_floor'])} / {x['speedup_vs_diffusers']:.3f}x",
                f"{c['max_abs_diff_vs_diffusers']:.1e}",
            ]
        )  # fmt: skip
    return rows


def overhead_rows(s: dict) -> list[list]:
    clock, rows = s["clock"], []
    for model, c in sampling_cases(s):
        m = c[clock]
        per = {k: v["median"] * US for k, v in m["seconds_per_image_step"].items()}
        loop = per["loop (stub UNet)"]
        rows.append(
            [
                model, c["batch"], c["steps"], f"{per['hf_ddpm (stub UNet)'] - loop:.1f}",
                f"{per['diffusers (stub UNet)'] - loop:.1f}", pct(m["overhead_over_floor_stub"]),
                pct(m["diffusers_overhead_over_floor_stub"]), f"{m['speedup_vs_diffusers_stub']:.3f}x",
            ]
        )  # fmt: skip
    return rows


def sampling_targets(s: dict) -> tuple[bool | None, bool]:
    """Verdicts from the overheads measured on their own (stub UNet): robust to the machine's load."""
    clock = s["clock"]
    at_1000 = [c for c in s["comparisons"] if c["steps"] >= 1000]
    overhead_ok = all(c[clock]["overhead_over_floor_stub"] <= 0.03 for c in at_1000) if at_1000 else None
    return overhead_ok, all(c[clock]["speedup_vs_diffusers_stub"] >= 1.0 for _, c in sampling_cases(s))


def sampling_section(s: dict) -> str:
    clock = s["clock"]
    out = ["## Sampling", "", machine_line(s), "", clock_note(s), ""]
    out.append(
        f"End to end: time per image per sampling step (µs, {clock} clock, median over interleaved rounds) of "
        "hf_ddpm's pipeline, diffusers' DDPMPipeline and the floor (the same UNet's forward passes alone, the same "
        "inputs). Overheads and the speed ratio are medians of per-round ratios; |Δ| is the largest difference "
        "between our images and diffusers' from the same seed (same weights)."
    )
    out.append("")
    headers = ["model", "batch", "steps", "UNet floor", "hf_ddpm", "diffusers DDPMPipeline", "ours over floor",
               "diffusers over floor", "ours vs diffusers (speed)", f"{other(clock)} clock: over floor / vs diffusers",
               "max \\|Δ\\|"]  # fmt: skip
    out += [table(headers, sampling_rows(s)), ""]
    out.append(
        "The overheads on their own: the same loops with a stub UNet that returns a fixed output at once (µs per "
        "image per step beyond a bare loop over the stub), over the floor above. A difference of two long runs "
        "(the end-to-end columns) carries the noise of both; this measures the added time directly. The implied "
        "speed ratio is (floor + diffusers' overhead) / (floor + ours). The verdicts use these."
    )
    out.append("")
    headers = ["model", "batch", "steps", "hf_ddpm overhead (µs)", "diffusers overhead (µs)", "ours over floor",
               "diffusers over floor", "ours vs diffusers (speed)"]  # fmt: skip
    out += [table(headers, overhead_rows(s)), ""]
    overhead_ok, never_slower = sampling_targets(s)
    out.append(f"- Target: overhead over the floor ≤ 3% at 1000 steps: {verdict(overhead_ok)}")
    out.append(f"- Target: never slower than diffusers' DDPMPipeline: {verdict(never_slower)}")
    o = s["speed_options"]
    out += ["", f"Speed options (our pipeline, {s['model']}, batch {o['batch']}, {o['steps']} steps):", ""]
    m, x = o[clock], o[other(clock)]
    rows = [
        [name, f"{m['seconds_per_image_step'][name]['median'] * US:.0f}", f"{m['speedup_vs_fp32'][name]:.2f}x",
         f"{x['speedup_vs_fp32'][name]:.2f}x"]
        for name in m["seconds_per_image_step"]
    ]  # fmt: skip
    out.append(table(["option", "µs / image / step", "speed vs fp32", f"({other(clock)} clock)"], rows))
    c = o.get("compile")
    if c and "error" in c:
        out.append(f"\ntorch.compile failed: `{c['error']}`")
    elif c:
        out.append(
            f"\ntorch.compile warmup (wall clock): the first call took {c['first_call_seconds']:.1f} s "
            f"(an eager call: {c['eager_call_seconds']:.1f} s); the table shows calls after it."
        )
    else:
        out.append("\ntorch.compile: not run in this profile (its warmup takes minutes on a CPU).")
    r = s["respacing"]
    out += ["", f"Respacing (time of one batch of {r['batch']}, {s['model']}, {clock} clock):", ""]
    rows = [
        [steps, f"{v['median']:.2f}", f"{r[clock]['speedup_vs_max_steps'][steps]:.1f}x"]
        for steps, v in r[clock]["seconds_per_batch"].items()
    ]
    out.append(table(["steps", "seconds", "speed vs the most steps"], rows))
    out.append("\nSample quality at these step counts: see Quality (FID vs steps).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- training


def training_section(t: dict) -> str:
    clock = t["clock"]
    m, x = t[clock], t[other(clock)]
    runs = next(iter(m["images_per_second"].values()))["runs"]
    out = ["## Training", "", machine_line(t), "", clock_note(t), ""]
    out.append(
        f"Images/s of the training loop ({t['model']}, batch {t['batch']}, {t['steps_per_run']} optimizer steps "
        f"per run, {runs} interleaved runs; median and IQR, {clock} clock). hf_ddpm: `hf_ddpm.training.train` with "
        "its defaults. diffusers example: the loop of train_unconditional.py (datasets + per-image transforms + "
        "DataLoader, DDPMScheduler.add_noise, F.mse_loss, clip_grad_norm_, AdamW, EMAModel.step with its defaults, "
        "loss.item() each step)."
    )
    out.append("")
    rows = [
        [name, f"{v['median']:.0f}", f"{v['iqr']:.0f}", f"{m['speedup_vs_diffusers_fp32'][name]:.2f}x",
         f"{x['speedup_vs_diffusers_fp32'][name]:.2f}x"]
        for name, v in m["images_per_second"].items()
    ]  # fmt: skip
    headers = ["loop", "images/s", "IQR", "vs diffusers example (fp32)", f"({other(clock)} clock)"]
    out.append(table(headers, rows))
    same = m["speedup_vs_same_precision"]
    out.append("")
    out.append("Ours over theirs at the same precision: " + ", ".join(f"{k} {v:.2f}x" for k, v in same.items()))
    c = t.get("compile")
    if c:
        out.append(
            f"\nhf_ddpm --compile (wall clock): the first {c['first_steps']} steps (compiling) took "
            f"{c['first_steps_seconds']:.0f} s; after them {c['images_per_second_after_compile']:.0f} images/s."
        )
    out.append(f"\n- Target: ≥ 1.2x the diffusers-style loop with our defaults: {verdict(same['fp32'] >= 1.2)}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- quality


def quality_section(q: dict) -> str:
    out = ["## Quality at equal compute", "", machine_line(q), ""]
    out.append(
        f"Each model: {q['model']}, batch {q['batch']}, {q['train_steps']} optimizer steps of hf_ddpm's training "
        f"loop (our defaults otherwise), T = {q['num_train_timesteps']}. The L_simple model is evaluated with both "
        "fixed variances; the hybrid model (L_simple + 0.001 L_vlb) with its learned_range variances."
    )
    for d in q["datasets"]:
        out += ["", f"### {d['data_source']}", ""]
        rows = [[k, v["optimizer_steps"], f"{v['train_seconds']:.0f}"] for k, v in d["training"].items()]
        out += [table(["loss", "optimizer steps", "training seconds"], rows), ""]
        b0 = d["bits_per_dim"][0]
        out.append(
            f"Bits/dim on held-out images: the exact bound (all T terms) and the Monte Carlo estimate with "
            f"K = {b0['monte_carlo_k']} on the same {b0['images']} images; the estimate on all "
            f"{b0['held_out']['images']} held-out images (± standard error over images and timesteps)."
        )
        out.append("")
        rows = [
            [
                b["model"], b["variance_type"], f"{b['exact']:.3f}",
                f"{b['monte_carlo']:.3f} ± {b['monte_carlo_stderr']:.3f}", f"{b['difference_in_stderrs']:+.2f}",
                verdict(b["within_2_stderr"]), f"{b['held_out']['monte_carlo']:.3f} ± {b['held_out']['stderr']:.3f}",
            ]
            for b in d["bits_per_dim"]
        ]  # fmt: skip
        headers = ["model", "variance", f"exact ({b0['images']} images)", f"Monte Carlo K={b0['monte_carlo_k']}",
                   "(MC - exact) / SE", "within 2 SE", f"held-out MC ({b0['held_out']['images']} images)"]  # fmt: skip
        out += [table(headers, rows), ""]
        out.append(
            f"- Target: Monte Carlo K = {b0['monte_carlo_k']} within 2 SE of exact: {verdict(all(b['within_2_stderr'] for b in d['bits_per_dim']))}"
        )
        out.append("")
        out.append(
            "Why the K-timestep estimate can miss: the KL terms are skewed toward small t. Simulated from each "
            f"image's exact terms (K = {b0['monte_carlo_k']} of them drawn uniformly, 2000 times):"
        )
        out.append("")
        rows = [
            [b["model"], b["variance_type"], f"{100 * b['kl_share_first_10_timesteps']:.0f}%",
             f"{b['simulated_median_over_exact']:.2f}", f"{100 * b['simulated_2se_coverage']:.0f}%"]
            for b in d["bits_per_dim"]
        ]  # fmt: skip
        headers = ["model", "variance", "share of the KL sum in t = 1..10", "median estimate / exact (KL part)",
                   "2-SE intervals that cover the exact value (95% if normal)"]  # fmt: skip
        out.append(table(headers, rows))
        if "fid" in d:
            out += ["", fid_block(d)]
    return "\n".join(out)


def fid_block(d: dict) -> str:
    f = d["fid"]
    out = [
        f"FID ({f['feature_extractor']}): {f['samples_per_set']} samples per row against {f['reference']}; "
        f"± the bootstrap standard deviation over resampled samples. Real held-out images against the same "
        f"reference give FID {f['real_held_out']['fid']:.1f} ({f['real_held_out']['images']} images): at this "
        "sample count FID is biased upward and noisy, so read differences against the ± column.",
        "",
    ]
    rows = [
        [
            s["model"],
            s["variance_type"],
            s["steps"],
            f"{s['fid']:.1f} ± {s['bootstrap_std']:.1f}",
            f"{s['sampling_seconds']:.0f}",
        ]
        for s in f["sets"]
    ]
    out.append(table(["model", "variance", "steps", "FID", "sampling seconds"], rows))
    r = d.get("respacing_target")
    if r and "relative_change_100" in r:
        changes = ", ".join(
            f"{s} steps {pct(r[f'relative_change_{s}'])}" for s in (250, 100, 50) if f"relative_change_{s}" in r
        )
        out.append(
            f"\n- Target: learned_range at 100 steps within 10% of its 1000-step FID ({r['samples']} samples each): "
            f"{verdict(r['within_10_percent_at_100'])} ({changes} vs 1000 steps)"
        )
    else:
        out.append(
            "\n- Target (100-step FID within 10% of 1000-step): not evaluated in this profile (no 1000-step set)."
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- gpu


def gpu_section(g: dict) -> str:
    out = ["## GPU", ""]
    if not g.get("measured"):
        out.append(
            f"{g.get('reason', 'not measured')}. On a machine with CUDA, `python -m benchmarks.run --only gpu` measures "
            f"the paper's CIFAR-10 model (35.7M parameters) training throughput at batch 128 in fp32 / bf16 / fp16 "
            f"against the paper's {g['paper_steps_per_second']:.0f} steps/s on a TPU v3-8, and its sampling throughput."
        )
        return "\n".join(out)
    out += [machine_line(g), "", f"{g['model']} on {g.get('gpu', g['device'])}, batch {g['batch']}:", ""]
    rows = [
        [p, f"{v['steps_per_second']:.1f}", f"{v['images_per_second']:.0f}", f"{v['vs_paper_tpu_v3_8']:.2f}x"]
        for p, v in g["training"].items()
    ]
    out += [table(["mixed precision", "steps/s", "images/s", "vs paper (21 steps/s, TPU v3-8)"], rows), ""]
    rows = []
    for name, row in g["sampling"].items():
        w = row["wall"]
        per = w["seconds_per_image_step"]
        rows.append(
            [name, row["batch"], f"{per['hf_ddpm']['median'] * US:.1f}", f"{per['diffusers']['median'] * US:.1f}",
             f"{per['unet_floor']['median'] * US:.1f}", pct(w["overhead_over_floor"]),
             f"{w['speedup_vs_diffusers']:.3f}x", f"{row['images_per_second_at_1000_steps']:.1f}"]
        )  # fmt: skip
    headers = ["dtype", "batch", "hf_ddpm µs/img/step", "diffusers", "floor", "ours over floor", "ours vs diffusers",
               "images/s at 1000 steps"]  # fmt: skip
    out.append(table(headers, rows))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- summary


def summary_section(results: dict) -> str:
    """The headline table (what README.md shows)."""
    rows = []
    s, t, q = results.get("sampling"), results.get("training"), results.get("quality")
    if s:
        clock = s["clock"]
        at_1000 = [c for c in s["comparisons"] if c["steps"] >= 1000] or s["comparisons"]
        worst = max(at_1000, key=lambda c: c[clock]["overhead_over_floor_stub"])
        overhead_ok, never_slower = sampling_targets(s)
        rows.append(
            [f"sampling overhead over the bare UNet forward passes ({s['model']}, batch {worst['batch']}, "
             f"{worst['steps']} steps)", "≤ 3% at 1000 steps",
             f"{pct(worst[clock]['overhead_over_floor_stub'])} (end to end: {pct(worst[clock]['overhead_over_floor'])})",
             verdict(overhead_ok)]
        )  # fmt: skip
        slowest_name, slowest = min(sampling_cases(s), key=lambda mc: mc[1][clock]["speedup_vs_diffusers_stub"])
        rows.append(
            [f"sampling speed vs diffusers DDPMPipeline, same weights (slowest case: {slowest_name}, batch "
             f"{slowest['batch']})", "≥ 1.00x",
             f"{slowest[clock]['speedup_vs_diffusers_stub']:.3f}x (end to end: "
             f"{slowest[clock]['speedup_vs_diffusers']:.3f}x)", verdict(never_slower)]
        )  # fmt: skip
    if t:
        m = t[t["clock"]]
        ratio = m["speedup_vs_same_precision"]["fp32"]
        ips = m["images_per_second"]
        rows.append(
            [f"training images/s vs diffusers-style loop ({t['model']}, batch {t['batch']}, fp32; {t['clock']} clock)",
             "≥ 1.2x", f"{ratio:.2f}x ({ips['hf_ddpm (defaults, fp32)']['median']:.0f} vs "
             f"{ips['diffusers example (fp32)']['median']:.0f})", verdict(ratio >= 1.2)]
        )  # fmt: skip
    if q:
        d = q["datasets"][0]
        worst = max(d["bits_per_dim"], key=lambda b: abs(b["difference_in_stderrs"]))
        rows.append(
            [f"bits/dim: Monte Carlo K={worst['monte_carlo_k']} vs exact ({worst['images']} images, worst model)",
             "within 2 SE", f"{worst['difference_in_stderrs']:+.2f} SE",
             verdict(all(b["within_2_stderr"] for b in d["bits_per_dim"]))]
        )  # fmt: skip
        r = d.get("respacing_target")
        if r and "relative_change_100" in r:
            rows.append(
                [f"FID, learned_range, 100 vs 1000 steps ({r['samples']} samples each)", "within 10%",
                 f"{r['fid_100']:.1f} vs {r['fid_1000']:.1f} ({pct(r['relative_change_100'])})",
                 verdict(r["within_10_percent_at_100"])]
            )  # fmt: skip
    if not rows:
        return ""
    m = next(iter(v for v in results.values() if v))["machine"]
    lines = [
        "## Summary",
        "",
        f"{m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, diffusers {m['diffusers']}.",
        "",
    ]
    return "\n".join(lines + [table(["measure", "target", "measured", "verdict"], rows)])


def write(results_dir: str = RESULTS_DIR) -> str:
    results = {name: read_json(name, results_dir) for name in ("sampling", "training", "quality", "gpu")}
    parts = ["# Benchmark results", "", "Written by `python -m benchmarks.run`; do not edit by hand.", ""]
    parts.append(summary_section(results))
    sections = {"sampling": sampling_section, "training": training_section, "quality": quality_section,
                "gpu": gpu_section}  # fmt: skip
    for name, render in sections.items():
        if results[name]:
            parts += ["", render(results[name])]
    plots = plot_all(results, results_dir)
    if plots:
        parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = os.path.join(results_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    return path


def plot_all(results: dict, results_dir: str) -> list[str]:
    if importlib.util.find_spec("matplotlib") is None:  # in the `bench` extra
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    from . import plots

    return plots.write(results, results_dir)


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else RESULTS_DIR))
