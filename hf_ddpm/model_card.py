"""Model cards of pushed pipelines: front matter (ModelCardData with a model-index of the measured metrics) and the
body, rendered from model_cards/model_card.md with huggingface_hub's `ModelCard.from_template`.

What a card says comes from the pipeline directory (unet/ and scheduler/ configs, weights, samples.png) and the run
that wrote it: training_args.json (the options, never the Hub token) and training_summary.json (steps, held-out
bits/dim). Metrics measured elsewhere are passed in; an FID must name its feature extractor and sample count.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .evaluation.schema import LIKELIHOOD_METRICS, METRICS, SAMPLE_METRICS, TITLES, VALUE_RANGES, WEIGHTS_KEY
from .shipped import shipped_dir

TEMPLATE_PATH = shipped_dir("model_cards", "model_cards") / "model_card.md"
TAGS = ["diffusers", "ddpm", "unconditional-image-generation", "hf_ddpm"]
DEFAULT_LICENSE = "apache-2.0"
TRAINING_ARGS_FILE, TRAINING_SUMMARY_FILE, SAMPLE_GRID = "training_args.json", "training_summary.json", "samples.png"
SECRET_WORDS = ("token", "secret", "password", "api_key")  # options whose values never reach a card
NOT_SHOWN = ("push_to_hub", "hub_model_id", "hub_private_repo", "output_dir", "logging_dir", "cache_dir")
FID_KEYS = ("value", "feature_extractor", "num_samples")
TASK = "unconditional-image-generation"


def render_model_card(
    pipeline_dir: str | Path,
    repo_id: str,
    *,
    training_dir: str | Path | None = None,
    metrics: dict | None = None,
    license: str = DEFAULT_LICENSE,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """The card of the pipeline in `pipeline_dir`, to be pushed as `repo_id`'s README.md.

    training_dir: where training_args.json / training_summary.json live (default: `pipeline_dir`).
    metrics: measured elsewhere, overriding the run's own: {"bits_per_dim": {"value", "stderr", "num_images",
    "num_timesteps" (None: exact bound), "split"}, "fid": {"value", "feature_extractor", "num_samples",
    "reference", "num_inference_steps"}}.
    """
    pipeline_dir = Path(pipeline_dir)
    template_path = Path(template_path)
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template {template_path} not found (it ships in model_cards/ of hf_ddpm)")
    args, summary = _read_json(Path(training_dir or pipeline_dir), TRAINING_ARGS_FILE, TRAINING_SUMMARY_FILE)
    data, hub_dataset, dataset_type = describe_data(args)
    rows = collect_metrics(summary, metrics)
    model = model_summary(pipeline_dir)
    base_model = (args or {}).get("pretrained_model_name_or_path")
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=TASK,
        tags=TAGS,
        license=license,
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model if base_model and _is_hub_id(base_model) else None,
        model_name=repo_id.split("/")[-1],
        metrics=[r["type"] for r in rows] or None,
        eval_results=[_eval_result(r, dataset_type, data or dataset_type) for r in rows] or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1],
        model=model,
        data=data,
        sample_grid=SAMPLE_GRID if (pipeline_dir / SAMPLE_GRID).is_file() else None,
        sample_caption=_sample_caption(args, model),
        training=public_training_args(args) if args else None,
        training_summary=_summary_lines(args or {}, summary or {}),
        results=rows,
        remote_code=_remote_files(pipeline_dir),
    )


def _remote_files(pipeline_dir: Path) -> list[str]:
    """The remote-code modules model_index.json names (hf_ddpm/remote_code.py), as paths in the repo."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    names = [(index.get("_class_name"), ""), (index.get("scheduler"), "scheduler/")]
    files = [f"{folder}{entry[0]}.py" for entry, folder in names if isinstance(entry, list) and entry[0]]
    return [f for f in files if (pipeline_dir / f).is_file()]


def read_json_object(path: Path) -> dict:
    """The JSON object in the file `path`; ValueError naming the file when it is not one (cut short, edited by hand)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({err}): write it again (save or train again)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds {type(value).__name__} {value!r:.40}, not a JSON object: save or train again")
    return value


def _read_json(directory: Path, *names: str) -> list[dict | None]:
    return [read_json_object(directory / n) if (directory / n).is_file() else None for n in names]


def _is_hub_id(value: str) -> bool:
    """'user/name' (or a canonical 'name') that is not a path on this machine."""
    return not os.path.isabs(value) and not os.path.exists(value) and value.count("/") <= 1 and "\\" not in value


def describe_data(args: dict | None) -> tuple[str | None, str | None, str]:
    """(description for the card, Hub dataset id or None, model-index dataset type); never a local path."""
    if args is None:
        return None, None, "unknown"
    name, local = args.get("dataset_name"), args.get("train_data_dir") or args.get("train_data_files")
    if name and _is_hub_id(name):
        return f"the Hub dataset [{name}](https://huggingface.co/datasets/{name})", name, name
    if name or local:
        return "a local image dataset", None, "imagefolder"
    return "scikit-learn's bundled 8×8 handwritten digits", None, "sklearn-digits"


# The form of a metrics file, as `python -m hf_ddpm evaluate --metrics_out` writes it (evaluation/schema.py).
METRICS_FORM = (
    '{"bits_per_dim": {"value": 3.75, "stderr": 0.01, "count": 10000, "protocol": "..."}, "fid": {"value": 3.17, '
    '"stderr": null, "count": 50000, "protocol": "...", "feature_extractor": "...", "num_samples": 50000}, ...}, '
    "as `python -m hf_ddpm evaluate --metrics_out` writes it"
)


def read_metrics_file(path: str | os.PathLike, what: str | None = None) -> dict:
    """The metrics of a JSON file for the card, checked (`check_metrics`); ValueError naming `what` (default: the
    file) and the expected form when it cannot be read, is not JSON or holds something else."""
    what = what or f"the metrics file {path}"
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ValueError(f"{what} cannot be read ({reason}); pass a JSON file of the form {METRICS_FORM}") from None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not JSON ({err}); expected the form {METRICS_FORM}") from None
    check_metrics(metrics, what)
    return metrics


def _is_number(value, integer: bool = False) -> bool:
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


HEX = set("0123456789abcdef")
ENTRY_NUMBERS = {"stderr": False, "bits_per_dim_stderr": False, "count": True, "num_images": True, "num_samples": True}


def check_metrics(metrics, what: str = "metrics") -> None:
    """ValueError naming `what`, the metric and the expected form unless `metrics` is {name: {"value": number,
    "stderr": number or null, "count": integer or null, ...}} with names of METRICS (an entry may be null: skipped)
    and an FID states FID_KEYS; an entry's WEIGHTS_KEY, where given, is a sha256 (compared with a folder's weights by
    measured_weights.check_measured_weights)."""
    if not isinstance(metrics, dict):
        kind = {list: "an array", str: "a string"}.get(type(metrics), f"the value {metrics!r}")
        raise ValueError(f"{what} holds {kind}, not an object of metrics; expected the form {METRICS_FORM}")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"{what}: unknown metrics {unknown}; a card reports {list(METRICS)}")
    for name, entry in metrics.items():
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(
                f"{what}: {name} is {entry!r}, not an object with its value; expected the form {METRICS_FORM}"
            )
        # the bound may come as training_summary.json's "eval" entry: {"bits_per_dim": 3.9, "bits_per_dim_stderr": ...}
        summary_form = name == "bits_per_dim" and "value" not in entry and "bits_per_dim" in entry
        value_key = "bits_per_dim" if summary_form else "value"
        value = entry.get(value_key)
        if not (_is_number(value) and math.isfinite(value)):
            raise ValueError(
                f"{what}: {name}'s {value_key} is {value!r}, not a finite number; expected the form {METRICS_FORM}"
            )
        low, high = VALUE_RANGES[name]
        if not low <= value <= high:
            raise ValueError(f"{what}: {name}'s {value_key} is {value!r}, outside [{low:g}, {high:g}] where it lies "
                             "(`python -m hf_ddpm evaluate --metrics_out` writes measured values)")  # fmt: skip
        for key, integer in ENTRY_NUMBERS.items():
            if entry.get(key) is not None and not _is_number(entry[key], integer):
                kind = "an integer" if integer else "a number"
                raise ValueError(
                    f"{what}: {name}'s {key} is {entry[key]!r}, not {kind} or null; expected the form {METRICS_FORM}"
                )
            if entry.get(key) is not None and entry[key] < 0:  # a count, or a spread
                raise ValueError(f"{what}: {name}'s {key} is {entry[key]!r}, below 0 (`python -m hf_ddpm evaluate "
                                 "--metrics_out` writes measured values)")  # fmt: skip
        digest = entry.get(WEIGHTS_KEY)  # which weights were measured: checked against the folder's by push
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= HEX):
            raise ValueError(f"{what}: {name}'s {WEIGHTS_KEY} is {digest!r:.80}, not the 64 hex digits of a sha256 or "
                             "null; evaluate again with `python -m hf_ddpm evaluate --metrics_out`")  # fmt: skip
    fid = metrics.get("fid")
    missing = [k for k in FID_KEYS if fid and fid.get(k) is None]
    if missing:
        raise ValueError(f"{what}: an FID must state {list(FID_KEYS)}; missing {missing}")


def collect_metrics(summary: dict | None, metrics: dict | None) -> list[dict]:
    """Rows {type, name, value, details, args} for the card's table and model-index: bits/dim, FID."""
    if metrics:
        check_metrics(metrics)
    metrics = dict(metrics or {})
    rows = []
    bpd = metrics.get("bits_per_dim") or (summary or {}).get("eval")
    if bpd:
        if "bits_per_dim" in bpd:  # training_summary.json's "eval" entry
            bpd = {**bpd, "value": bpd["bits_per_dim"], "stderr": bpd.get("bits_per_dim_stderr")}
        k, n = bpd.get("num_timesteps"), bpd.get("num_images")
        how = "exact bound (all T terms)" if k is None else f"Monte Carlo estimate, {k} timesteps per image"
        split = bpd.get("split", "held-out split")
        value = f"{bpd['value']:.4f}" + (f" ± {bpd['stderr']:.4f}" if bpd.get("stderr") is not None else "")
        rows.append(
            {
                "type": "bits_per_dim",
                "name": "Bits/dim (variational bound, DDPM eq. 5)",
                "value": value,
                "number": round(float(bpd["value"]), 4),
                "details": f"{how}, {n} images of the {split}" + (" (± standard error)" if bpd.get("stderr") else ""),
                "args": {"num_images": n, "num_timesteps": k, "stderr": bpd.get("stderr")},
            }
        )
    fid = metrics.get("fid")
    if fid:
        details = f"{fid['num_samples']} samples, features of {fid['feature_extractor']}"
        if fid.get("reference"):
            details += f", against {fid['reference']}"
        if fid.get("num_inference_steps"):
            details += f", {fid['num_inference_steps']} sampling steps"
        if fid.get("protocol"):  # hf_ddpm.evaluation's sentence: what was compared with what
            details = fid["protocol"]
        rows.append(
            {
                "type": "fid",
                "name": f"FID ({fid['feature_extractor']}, {fid['num_samples']} samples)",
                "value": f"{fid['value']:.2f}",
                "number": round(float(fid["value"]), 4),
                "details": details,
                "args": {k: fid.get(k) for k in ("feature_extractor", "num_samples", "reference")},
            }
        )
    for name in SAMPLE_METRICS[1:]:  # precision, recall, KID: from the same features as the FID
        entry = metrics.get(name)
        if entry:
            rows.append(
                {
                    "type": name,
                    "name": TITLES[name],
                    "value": f"{entry['value']:.4f}",
                    "number": round(float(entry["value"]), 4),
                    "details": entry.get("protocol", ""),
                    "args": {k: entry.get(k) for k in ("feature_extractor", "num_samples", "reference")},
                }
            )
    for name in LIKELIHOOD_METRICS:  # beyond eq. 5 (evaluation/likelihood.py): whichever were measured
        entry = metrics.get(name)
        if entry:
            spread = f" ± {entry['stderr']:.4f}" if entry.get("stderr") is not None else ""
            rows.append(
                {
                    "type": name,
                    "name": TITLES[name],
                    "value": f"{entry['value']:.4f}{spread}",
                    "number": round(float(entry["value"]), 4),
                    "details": "; ".join(x for x in (entry.get("protocol"), entry.get("bounds")) if x),
                    "args": {"num_images": entry.get("count"), "stderr": entry.get("stderr")},
                }
            )
    return rows


def _eval_result(row: dict, dataset_type: str, dataset_name: str) -> EvalResult:
    return EvalResult(
        task_type=TASK,
        task_name="Unconditional image generation",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        metric_type=row["type"],
        metric_name=row["name"],
        metric_value=row["number"],
        metric_args={k: v for k, v in row["args"].items() if v is not None},
    )


def public_training_args(args: dict) -> dict[str, str]:
    """The training options fit for a public card: no secrets, no paths of the training machine."""
    shown = {}
    for key, value in sorted(args.items()):
        if any(word in key.lower() for word in SECRET_WORDS) or key in NOT_SHOWN:
            continue
        if isinstance(value, str) and (os.path.isabs(value) or (os.sep in value and os.path.exists(value))):
            value = "(a local path)"
        shown[key] = json.dumps(value, ensure_ascii=False).replace("|", "\\|")
    return shown


def _summary_lines(args: dict, summary: dict) -> list[str]:
    lines = []
    if "optimizer_steps" in summary:
        seconds, processes = summary.get("train_seconds", 0), summary.get("world_size", 1)
        took = (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60
                else f"{seconds:.0f} s")  # fmt: skip
        lines.append(
            f"{summary['optimizer_steps']} optimizer steps of {summary.get('images_per_optimizer_step', '?')} images "
            f"on {processes} process{'es' if processes > 1 else ''} in {took}, mixed precision "
            f"`{summary.get('mixed_precision', 'no')}`"
        )
    if "learning_rate" in args:
        lines.append(
            f"AdamW, learning rate {args['learning_rate']} ({args.get('lr_scheduler')} schedule, "
            f"{args.get('lr_warmup_steps')} warmup steps), loss `{args.get('loss', 'simple')}`"
        )
    if args.get("use_ema"):
        decay = f" (max decay {args['ema_max_decay']})" if "ema_max_decay" in args else ""
        lines.append(f"weights: the exponential moving average{decay}")
    return lines


def _sample_caption(args: dict | None, model: dict) -> str:
    if not args:
        return "Samples from this pipeline."
    steps = min(args.get("ddpm_num_inference_steps") or model["num_train_timesteps"], model["num_train_timesteps"])
    respaced = f" (respaced from T = {model['num_train_timesteps']})" if steps < model["num_train_timesteps"] else ""
    return f"{args.get('eval_batch_size', '')} samples drawn at the end of training: {steps} steps{respaced}, seed {args.get('seed')}."


def model_summary(pipeline_dir: Path) -> dict:
    """Numbers the card states about the network and the diffusion, read from the configs and weight headers."""
    unet = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    scheduler = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    channels = unet["in_channels"]
    schedule = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None:
        schedule = "given β values (trained_betas)"
    elif schedule in ("linear", "scaled_linear", "sigmoid"):
        schedule += f", β from {scheduler.get('beta_start')} to {scheduler.get('beta_end')}"
    elif schedule == "squaredcos_cap_v2":
        schedule = "cosine (Improved DDPM eq. 17)"
    count = count_parameters(pipeline_dir / "unet")
    return {
        "parameters": f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}",
        "image_shape": f"{channels}×{height}×{width}",
        "image_shape_chw": f"{channels}, {height}, {width}",
        "num_train_timesteps": scheduler.get("num_train_timesteps", 1000),
        "steps": scheduler.get("num_train_timesteps", 1000),
        "beta_schedule": schedule,
        "variance_type": scheduler.get("variance_type", "fixed_small"),
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "timestep_spacing": scheduler.get("timestep_spacing", "leading"),  # which timesteps a respaced chain visits
        "sampler": scheduler.get("_class_name", "HFDDPMScheduler"),  # another scheduler swapped in: diffusers' name
    }


def weight_files(unet_dir: Path) -> list[str]:
    """The safetensors files of a saved UNet's weights: its index's shards, else diffusers' one file (a variant's
    files, `variant=` of save_pretrained, are not the repo's weights: a repo loads without `variant=`)."""
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = read_json_object(index).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise ValueError(f"{index} maps no weights to files: save the pipeline again with save_pretrained")
        return sorted(set(shards.values()))
    return ["diffusion_pytorch_model.safetensors"]


def count_parameters(unet_dir: Path) -> int:
    """Parameters in the UNet's safetensors weights, from the file headers alone (no tensor is read)."""
    total = 0
    files = weight_files(unet_dir)
    for name in files:
        with open(unet_dir / name, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total
