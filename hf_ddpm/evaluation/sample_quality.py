"""The sample metrics of one evaluation: samples (resumable shards), their features, the reference, and
FID, precision/recall and KID, each naming its protocol."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from .bits_per_dim import images_digest
from .feature_metrics import K_NEAREST, frechet_distance, kernel_inception_distance, precision_recall
from .reference import cached_reference, default_cache_dir, external_reference, features_in_blocks
from .sample_shards import generate_shards, load_shards
from .schema import PROTOCOLS, Metric
from .steps import few_step_scheduler


def reference_pool(args, data, where: dict):
    """The reference images of the protocol (uint8 (N, C, H, W)); ValueError when they are too few for FID (2) or
    for the k-NN radii of precision/recall (more than K_NEAREST)."""
    split = PROTOCOLS[args.protocol]
    pool = (data.train if split == "train" else data.eval)[: args.reference_count]
    if len(pool) <= K_NEAREST:
        raise ValueError(
            f"the {where[split]} has {len(pool)} image(s): the reference needs at least 2 (FID) and more than "
            f"{K_NEAREST} (precision/recall's k-NN radii); hold out more images (--eval_size), raise "
            "--reference_count, or pass --fid_reference STATS.npz"
        )
    return pool


def check_reference(args, data, where: dict, extractor=None) -> None:
    """Refuse, before any work, a --fid_reference that does not read or does not fit the feature extractor, and a
    reference split too small for the metrics. Nothing is loaded but the statistics file (not Inception)."""
    if args.fid_reference is not None:
        from .features import InceptionFeatures

        external_reference(args.fid_reference, (extractor or InceptionFeatures).dim)
    else:
        reference_pool(args, data, where)


def sample_metrics(pipe, args, data, where: dict, options: dict, processes, extractor, device) -> list[Metric]:
    from .features import InceptionFeatures

    cache_dir = Path(args.reference_cache_dir) if args.reference_cache_dir else default_cache_dir()
    # the reference first: a bad --fid_reference is refused before any sample is drawn
    if args.fid_reference is not None:
        reference = external_reference(args.fid_reference, (extractor or InceptionFeatures).dim)
        protocol = f"vs {reference.description} (--fid_reference)"
    extractor = extractor or InceptionFeatures(device=device)
    if args.fid_reference is None:
        split = PROTOCOLS[args.protocol]
        pool = reference_pool(args, data, where)
        about = f"{len(pool)} images of the {where[split]}"
        key = {
            "data": {k: v for k, v in options.items() if k != "cache_dir"},
            "source": data.source,
            "split": split,
            "shape": list(pool.shape[1:]),
            "count": len(pool),
            "pixels": images_digest(pool),  # files changed since, under the same names: other statistics
        }
        reference = cached_reference(key, extractor, lambda: pool, about, cache_dir=cache_dir, processes=processes)
        label = "the DDPM paper's protocol: vs the training split" if split == "train" else "held-out protocol"
        protocol = f"vs {about} ({label})"

    if processes.is_main and args.fid_reference is None:
        how = f"computed ({reference.count} images through the feature extractor)" if reference.computed else "read"
        print(f"reference statistics {how}: {reference.path}")

    steps = args.num_inference_steps or pipe.scheduler.config.num_train_timesteps
    saved_scheduler = pipe.scheduler
    pipe.scheduler, steps_named = few_step_scheduler(saved_scheduler, steps)
    sample_dir = Path(args.sample_dir) if args.sample_dir else default_sample_dir(args, steps, cache_dir)
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    started = time.perf_counter()
    try:
        shards = generate_shards(pipe, sample_dir, args.num_samples, num_inference_steps=steps, seed=options["seed"],
                                 shard_size=args.batch_size, png=args.png, model=model, processes=processes,
                                 progress=True)  # fmt: skip
    finally:
        pipe.scheduler = saved_scheduler
    if processes.is_main:
        found = f", the rest found in {sample_dir}" if shards["generated"] < shards["shards"] else f" into {sample_dir}"
        print(f"samples: {shards['generated']} of {shards['shards']} shards drawn now{found}")
    sampling_seconds = time.perf_counter() - started
    sizes = [min(args.batch_size, args.num_samples - j * args.batch_size) for j in range(shards["shards"])]
    features = features_in_blocks(extractor, lambda j: load_shards(sample_dir, [j]), shards["shards"], processes,
                                  sizes=sizes, desc="sample features")  # fmt: skip
    feature_seconds = time.perf_counter() - started - sampling_seconds

    details = {"num_samples": len(features), "num_inference_steps": steps, "timesteps": steps_named,
               "feature_extractor": extractor.name,
               "reference": reference.description, "sample_dir": str(sample_dir), "seed": options["seed"],
               "shards_drawn": shards["generated"], "sampling_seconds": sampling_seconds,  # this run's shards
               "feature_seconds": feature_seconds}  # fmt: skip
    what = f"{len(features)} samples at {steps} steps {protocol}; {extractor.name}; steps: {steps_named}"
    metrics = [Metric("fid", frechet_distance(reference.stats, features), None, len(features), what, details)]
    if reference.features is not None:
        precision, recall = precision_recall(reference.features, features, K_NEAREST)
        kid, spread = kernel_inception_distance(reference.features, features, seed=options["seed"])
        for name, value in (("precision", precision), ("recall", recall)):
            metrics.append(Metric(name, value, None, len(features), what, {**details, "k": K_NEAREST}))
        metrics.append(Metric("kid", kid, None, len(features), what, {**details, "subset_std": spread}))
    return metrics


def default_sample_dir(args: argparse.Namespace, steps: int, cache_dir: Path) -> Path:
    """A directory named for the model and the sampling settings (`steps`: the
    sampling steps resolved from the flag or T), so that a run started again finds its shards."""
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    key = json.dumps([model, args.num_samples, steps, args.seed, args.batch_size])
    return cache_dir.parent / "samples" / hashlib.sha256(key.encode()).hexdigest()[:16]
