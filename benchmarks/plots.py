"""PNG plots of the benchmark results (matplotlib, the `bench` extra); called by benchmarks.report."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

US = 1e6


def _save(fig, results_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, name), dpi=110)
    plt.close(fig)
    return name


def sampling(s: dict, results_dir: str) -> str:
    """Per-step cost of the floor, ours and diffusers' for each measured case, and respacing wall time."""
    cases = [(f"{s['model']}\nbatch {c['batch']}, {c['steps']} steps", c) for c in s["comparisons"]]
    if s.get("large_model"):
        c = s["large_model"]
        cases.append((f"{c['model']}\nbatch {c['batch']}, {c['steps']} steps", c))
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(4 * (len(cases) + 1), 3.6))
    names = [("unet_floor", "UNet floor"), ("hf_ddpm", "hf_ddpm"), ("diffusers", "diffusers")]
    clock = s["clock"]
    for ax, (label, c) in zip(axes, cases):
        per = c[clock]["seconds_per_image_step"]
        values = [per[k]["median"] * US for k, _ in names]
        errors = [per[k]["iqr"] * US / 2 for k, _ in names]
        ax.bar([n for _, n in names], values, yerr=errors, color=["#999999", "#1f77b4", "#ff7f0e"], capsize=3)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(f"µs per image per step ({clock} clock)")
        ax.set_ylim(0, max(v + e for v, e in zip(values, errors)) * 1.08)
    r = s["respacing"]
    steps = [int(k) for k in r[clock]["seconds_per_batch"]]
    ax = axes[-1]
    ax.plot(steps, [v["median"] for v in r[clock]["seconds_per_batch"].values()], "o-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (respaced)")
    ax.set_ylabel(f"seconds per batch of {r['batch']}")
    ax.set_title(f"respacing ({clock} clock)", fontsize=9)
    return _save(fig, results_dir, "sampling.png")


def training(t: dict, results_dir: str) -> str:
    items = list(t[t["clock"]]["images_per_second"].items())
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.5))
    labels = [name for name, _ in items]
    values = [v["median"] for _, v in items]
    colors = [
        "#1f77b4" if n.startswith("hf_ddpm") else "#999999" if n.startswith("floor") else "#ff7f0e" for n in labels
    ]
    ax.barh(labels, values, xerr=[v["iqr"] / 2 for _, v in items], color=colors, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(f"images/s ({t['model']}, batch {t['batch']}; {t['clock']} clock)")
    ax.set_title("training throughput", fontsize=10)
    return _save(fig, results_dir, "training.png")


def quality(q: dict, results_dir: str) -> str | None:
    d = q["datasets"][0]
    if "fid" not in d:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series: dict[str, list] = {}
    for s in d["fid"]["sets"]:
        series.setdefault(f"{s['model']} / {s['variance_type']}", []).append(s)
    markers = "osD^v"
    for i, (label, sets) in enumerate(series.items()):
        sets = sorted(sets, key=lambda s: s["steps"])
        shift = 1.06 ** (i - (len(series) - 1) / 2)  # side by side where series share a step count
        ax.errorbar([s["steps"] * shift for s in sets], [s["fid"] for s in sets],
                    yerr=[s["bootstrap_std"] for s in sets], marker=markers[i % len(markers)], capsize=3,
                    label=label)  # fmt: skip
    ax.axhline(
        d["fid"]["real_held_out"]["fid"],
        color="gray",
        ls="--",
        label=f"real held-out images ({d['fid']['real_held_out']['images']})",
    )
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (respaced)")
    ax.set_ylabel(f"FID ({d['fid']['samples_per_set']} samples)")
    ax.set_title(f"FID vs steps: {d['data_source']}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, results_dir, "quality_fid.png")


def write(results: dict, results_dir: str) -> list[str]:
    written = []
    if results.get("sampling"):
        written.append(sampling(results["sampling"], results_dir))
    if results.get("training"):
        written.append(training(results["training"], results_dir))
    if results.get("quality"):
        name = quality(results["quality"], results_dir)
        if name:
            written.append(name)
    return written
