"""The Sampling section of RESULTS.md: end to end and stub-measured overheads, speed options, respacing."""

from __future__ import annotations

from .markdown import US, clock_note, machine_line, other, pct, table, verdict


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
