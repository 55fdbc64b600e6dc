"""The benchmark plots (matplotlib, the `bench` extra), drawn from the results' JSON beside RESULTS.md."""

from __future__ import annotations

import importlib.util
import os
import sys

from .report import US, sampling_cases


def plots(results: dict, results_dir: str) -> list[str]:
    """PNG plots (matplotlib, the `bench` extra): sampling cost per step, training throughput, FID vs steps (the
    names returned, which RESULTS.md shows at its end), and the likelihood section's rate-distortion curves (which
    that section names)."""
    if importlib.util.find_spec("matplotlib") is None:  # keep the plots an earlier run drew from these files
        print("matplotlib is not installed (pip install -e '.[bench]'): plots not redrawn", file=sys.stderr)
        names = ("sampling.png", "training.png", "quality_fid.png")
        return [n for n in names if os.path.isfile(os.path.join(results_dir, n))]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    def save(fig, name: str, dpi: int = 110) -> str:
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, name), dpi=dpi)
        plt.close(fig)
        return name

    written = []
    s, t, q, lk = (results.get(k) for k in ("sampling", "training", "quality", "likelihood"))
    if s:
        cases, clock = sampling_cases(s), s["clock"]
        fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), squeeze=False)
        for ax, (model, c) in zip(axes[0], cases):
            per = c[clock]["seconds_per_image_step"]
            keys = ("unet_floor", "hf_ddpm", "diffusers")
            ax.bar(keys, [per[k]["median"] * US for k in keys], yerr=[per[k]["iqr"] * US / 2 for k in keys],
                   color=["#999999", "#1f77b4", "#ff7f0e"], capsize=3)  # fmt: skip
            ax.set_title(f"{model}\nbatch {c['batch']}, {c['steps']} steps", fontsize=9)
            ax.set_ylabel(f"µs per image per step ({clock} clock)")
        written.append(save(fig, "sampling.png"))
    if t:
        items = list(t[t["clock"]]["images_per_second"].items())
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.5))
        colors = ["#1f77b4" if n.startswith("hf_ddpm") else "#999999" if n.startswith("floor") else "#ff7f0e"
                  for n, _ in items]  # fmt: skip
        ax.barh([n for n, _ in items], [v["median"] for _, v in items], xerr=[v["iqr"] / 2 for _, v in items],
                color=colors, capsize=3)  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel(f"images/s ({t['model']}, batch {t['batch']}; {t['clock']} clock)")
        written.append(save(fig, "training.png"))
    d = q["datasets"][0] if q else {}
    if "fid" in d:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        series: dict[str, list] = {}
        for row in d["fid"]["sets"]:
            series.setdefault(f"{row['model']} / {row['variance_type']}", []).append(row)
        for i, (label, rows) in enumerate(series.items()):
            rows.sort(key=lambda r: r["steps"])
            shift = 1.06 ** (i - (len(series) - 1) / 2)  # side by side where series share a step count
            ax.errorbar([r["steps"] * shift for r in rows], [r["fid"] for r in rows],
                        yerr=[r["bootstrap_std"] for r in rows], marker="osD^v"[i % 5], capsize=3, label=label)  # fmt: skip
        real = d["fid"]["real_held_out"]
        ax.axhline(real["fid"], color="gray", ls="--", label=f"real held-out images ({real['images']})")
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (respaced)")
        ax.set_ylabel(f"FID ({d['fid']['samples_per_set']} samples)")
        ax.legend(fontsize=8)
        written.append(save(fig, "quality_fid.png"))
    if lk:  # both models' curves
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, key, label in zip(
            axes, ("distortion_rmse", "rate_bits_per_dim"), ("distortion (RMSE, [0, 255])", "rate (bits/dim)")
        ):
            for name, m in lk["models"].items():
                ax.plot(m["rate_distortion"][key], label=name)
            ax.set(xlabel="reverse steps (T - t)", ylabel=label)
        axes[1].legend()
        fig.suptitle("Progressive coding (DDPM Fig. 5)")
        save(fig, "likelihood_rate_distortion.png", dpi=100)
    return written
