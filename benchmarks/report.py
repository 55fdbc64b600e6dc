"""RESULTS.md (Markdown tables) and PNG plots from the JSON files in benchmarks/results/; the README's summary.

python -m benchmarks.report [RESULTS_DIR]
"""

from __future__ import annotations

import importlib.util
import os
import sys

from .common import RESULTS_DIR, read_json
from .common import TRAINING_FLOOR as FLOOR
from .markdown import US, clock_note, machine_line, other, pct, table, verdict
from .report_sampling import sampling_cases, sampling_section, sampling_targets

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
    bound = m["speedup_vs_diffusers_fp32"].get(FLOOR)
    if bound is not None:
        ours = m["speedup_vs_diffusers_fp32"]["hf_ddpm (defaults, fp32)"]
        out.append(
            f"\nThe floor row is the UNet's own work in a step and nothing else (forward, L_simple, backward, fused "
            f"AdamW on one fixed batch). Our loop runs at {ours / bound:.0%} of its speed, the diffusers-style loop at "
            f"{1 / bound:.0%} (medians of paired ratios; the IQR column shows the runs' spread): no loop doing the "
            f"same fp32 arithmetic can beat theirs by more than about {bound:.2f}x here. Beyond that it takes faster "
            "kernels or less precise arithmetic: the bf16 and --compile rows above."
        )
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
            "Why the estimate draws its timesteps the way it does: the KL terms are skewed toward small t. Simulated "
            f"from each image's exact terms (K = {b0['monte_carlo_k']} of them, 2000 times), K timesteps drawn "
            "uniformly against hf_ddpm's stratified draws from ½ uniform + ½ ∝ 1/t (hf_ddpm/bound.py):"
        )
        out.append("")
        rows = []
        for b in d["bits_per_dim"]:
            sim = b["simulated"]
            rows.append([b["model"], b["variance_type"], f"{100 * sim['kl_share_first_10_timesteps']:.0f}%"] + [
                f"{sim[design]['median_over_exact']:.2f} / {100 * sim[design]['relative_rmse']:.0f}% / "
                f"{100 * sim[design]['2se_coverage']:.0f}%" for design in ("uniform", "hf_ddpm")
            ])  # fmt: skip
        headers = ["model", "variance", "share of the KL sum in t = 1..10",
                   "uniform t: median / exact, RMS error, 2-SE coverage",
                   "hf_ddpm: median / exact, RMS error, 2-SE coverage"]  # fmt: skip
        out.append(table(headers, rows))
        if "fid" in d:
            out += ["", fid_block(d)]
    return "\n".join(out)


def fid_block(d: dict) -> str:
    f = d["fid"]
    real, samples = f["real_held_out"], f["samples_per_set"]
    fewer = f", fewer than the {samples} samples: its upward bias is larger" if real["images"] < samples else ""
    out = [
        f"FID ({f['feature_extractor']}): {samples} samples per row against {f['reference']}; ± the bootstrap "
        f"standard deviation over resampled samples. Real held-out images against the same reference give FID "
        f"{real['fid']:.1f} ({real['images']} images{fewer}). At these counts FID is biased upward and noisy: read "
        "differences against the ± column, and compare rows with each other rather than with published FIDs.",
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
        floor = m["speedup_vs_diffusers_fp32"].get(FLOOR)
        bound = f"; the UNet step alone: {floor:.2f}x" if floor else ""
        rows.append(
            [f"training images/s vs diffusers-style loop ({t['model']}, batch {t['batch']}, fp32; {t['clock']} clock)",
             "≥ 1.2x", f"{ratio:.2f}x ({ips['hf_ddpm (defaults, fp32)']['median']:.0f} vs "
             f"{ips['diffusers example (fp32)']['median']:.0f}){bound}", verdict(ratio >= 1.2)]
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


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def update_readme(summary: str, readme: str = README) -> None:
    """Replace the README's text between the benchmark markers with the latest summary table."""
    with open(readme) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no '{README_START}' ... '{README_END}' section to write the summary into")
    body = summary.split("\n", 2)[2]  # without the "## Summary" heading: the README's own heading stands above
    body += "\n\nAll tables, the plots and how each number is measured: [benchmarks/results/RESULTS.md]"
    body += "(benchmarks/results/RESULTS.md). Rerun with `make bench` (about an hour on two CPU cores)."
    with open(readme + ".tmp", "w") as f:
        f.write(text[: start + len(README_START)] + "\n" + body + "\n" + text[end:])
    os.replace(readme + ".tmp", readme)


def write(results_dir: str = RESULTS_DIR, readme: str | None = None) -> str:
    """Write RESULTS.md and the plots into `results_dir`; with `readme`, also that file's summary section."""
    results = {name: read_json(name, results_dir) for name in ("sampling", "training", "quality", "gpu")}
    parts = ["# Benchmark results", "", "Written by `python -m benchmarks.run`; do not edit by hand.", ""]
    summary = summary_section(results)
    parts.append(summary)
    if readme and summary:
        update_readme(summary, readme)
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
    directory = sys.argv[1] if len(sys.argv) > 1 else RESULTS_DIR
    print(write(directory, readme=README if os.path.abspath(directory) == RESULTS_DIR else None))
