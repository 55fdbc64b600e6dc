"""The likelihood API (hf_ddpm/evaluation/likelihood.py): every method through one call, each result naming itself,
its cost and what it bounds; ε from every parametrization; progress that `set_progress_bar_config` turns off;
bad input refused naming the value; over a split in blocks that resume; `python -m hf_ddpm evaluate --likelihood`."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.cli import build_parser
from hf_ddpm.evaluation.likelihood import METHODS, likelihood_over_split, log_likelihood
from hf_ddpm.evaluation.run import evaluate
from hf_ddpm.probability_flow import epsilon_from_output

T, SIZE = 20, 8
FAST_ODE = {"rtol": 1e-3, "atol": 1e-3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pipe(**scheduler_kwargs) -> HFDDPMPipeline:
    torch.manual_seed(0)
    learned = scheduler_kwargs.get("variance_type") == "learned_range"
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=2 if learned else 1))
    pipe = HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T, **scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def digits(n: int) -> torch.Tensor:
    from hf_ddpm.data import load_data

    return load_data(resolution=SIZE, max_train_samples=n).train[:n]


def test_every_method_names_itself_its_cost_and_what_it_bounds(pipe):
    images = digits(2)
    outs = {}
    for method in METHODS:
        options = FAST_ODE if method == "ode" else {"num_trajectories": 4, "num_samples": 2} if method == "iw" else {}
        outs[method] = out = log_likelihood(pipe, images, method, generator=torch.manual_seed(0), **options)
        assert out.method == method and "bound" in out.bounds
        assert out.bits_per_dim.shape == out.standard_error.shape == out.model_evaluations.shape == (2,)
        assert torch.all(torch.isfinite(out.bits_per_dim)) and torch.all(out.bits_per_dim > 0)
    assert outs["bound"].model_evaluations.tolist() == [T, T]
    assert outs["trajectory"].model_evaluations.tolist() == [16 * T] * 2  # M = 16 trajectories of T steps
    assert outs["iw"].model_evaluations.tolist() == [4 * T] * 2 and outs["iw"].details["num_samples"] == 2
    nfe = outs["ode"].details["nfe"]
    assert torch.all(nfe >= 6) and torch.equal(outs["ode"].model_evaluations, nfe)  # one probe per evaluation
    # the bound is the pipeline's own bits_per_dim (same generator), and rate-distortion comes from that pass
    direct = pipe.bits_per_dim(images, generator=torch.manual_seed(0)).bits_per_dim
    torch.testing.assert_close(outs["bound"].bits_per_dim, direct.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(outs["rate_distortion"].bits_per_dim, direct.cpu(), rtol=0, atol=0)
    rate = outs["rate_distortion"].details["rate"]
    assert rate.shape == (2, T + 1) and torch.allclose(rate[:, -1], direct.cpu().double())
    assert math.isnan(outs["bound"].standard_error[0])  # one draw of x_t per term: unknown, not 0
    assert torch.all(outs["trajectory"].standard_error > 0) and torch.all(outs["iw"].standard_error > 0)


def test_the_odes_standard_error_is_nan_since_its_dequantization_draw_is_unmeasured(pipe):
    """One draw u per image moves the value, so an exact divergence does not make it exact: NaN (as eq. 5's one x_t
    per term), never 0; the probes' own spread at that u is kept in details."""
    images = digits(1)
    runs = [log_likelihood(pipe, images, "ode", divergence="exact", generator=torch.manual_seed(seed), **FAST_ODE)
            for seed in (0, 1)]  # fmt: skip
    assert runs[0].bits_per_dim.item() != runs[1].bits_per_dim.item()  # the draw moves it
    for out in runs:
        assert math.isnan(out.standard_error.item()) and out.details["probe_standard_error"].item() == 0
    probes = log_likelihood(pipe, images, "ode", num_probes=2, generator=torch.manual_seed(0), **FAST_ODE)
    assert math.isnan(probes.standard_error.item()) and probes.details["probe_standard_error"].item() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_epsilon_from_every_parametrization(prediction_type):
    from types import SimpleNamespace

    torch.manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    alpha_bar = 0.3
    x = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps  # DDPM eq. 4
    output = {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(alpha_bar) * eps - math.sqrt(1 - alpha_bar) * x0}
    config = SimpleNamespace(prediction_type=prediction_type, variance_type="fixed_small")
    torch.testing.assert_close(epsilon_from_output(output[prediction_type], x, alpha_bar, config), eps)
    learned = SimpleNamespace(prediction_type=prediction_type, variance_type="learned_range")
    with_variance = torch.cat([output[prediction_type], torch.full_like(eps, 0.3)], dim=1)  # the mean channels first
    torch.testing.assert_close(epsilon_from_output(with_variance, x, alpha_bar, learned), eps)


def test_learned_range_and_v_prediction_models_run_every_method():
    for kwargs in ({"variance_type": "learned_range"}, {"prediction_type": "v_prediction"}):
        pipe = make_pipe(**kwargs)
        out = log_likelihood(pipe, digits(1), "ode", generator=torch.manual_seed(0), **FAST_ODE)
        assert torch.isfinite(out.bits_per_dim).all(), kwargs
        assert torch.isfinite(log_likelihood(pipe, digits(1), "iw", num_samples=2).bits_per_dim).all()


def test_progress_follows_set_progress_bar_config(pipe, capsys):
    images = digits(1)
    pipe.set_progress_bar_config(disable=False)
    try:
        log_likelihood(pipe, images, "ode", generator=torch.manual_seed(0), **FAST_ODE)
        ode = capsys.readouterr().err
        pipe.bits_per_dim(images)
        bound = capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "1/1" in ode and f"{T}/{T}" in bound and "<" in ode and "<" in bound  # a count and an ETA (elapsed<left)
    # within an image too (seconds each at CIFAR-10 size on a CPU): where in t its ODE is, and what it cost so far
    assert re.search(r"0/1 .*t=0\.000 of 1, 1 evaluations", ode), ode
    pipe.bits_per_dim(images)
    log_likelihood(pipe, images, "trajectory", num_trajectories=2)
    assert capsys.readouterr().err == ""


def test_the_pipeline_method_is_the_one_api(pipe):
    images = digits(2)
    ours = pipe.log_likelihood(images, "iw", num_samples=2, num_trajectories=4, generator=torch.manual_seed(3))
    direct = log_likelihood(pipe, images, "iw", num_samples=2, num_trajectories=4, generator=torch.manual_seed(3))
    assert ours.method == "iw" and torch.equal(ours.bits_per_dim, direct.bits_per_dim)


def test_bad_input_is_refused_naming_the_value(pipe):
    images = digits(1)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        log_likelihood(pipe, images.float(), "ode")
    with pytest.raises(ValueError, match="method='exact'.*choose one of"):
        log_likelihood(pipe, images, "exact")
    with pytest.raises(ValueError, match=r"num_samples.*got 0"):
        log_likelihood(pipe, images, "iw", num_samples=0)
    with pytest.raises(ValueError, match=r"num_probes.*got 0"):
        log_likelihood(pipe, images, "ode", num_probes=0)
    with pytest.raises(ValueError, match="num_trajectories=6 must be a multiple of num_samples K = 4"):
        log_likelihood(pipe, images, "iw", num_samples=4, num_trajectories=6)
    # an option the method does not read (a swapped method, a misplaced keyword) is refused, not ignored
    with pytest.raises(ValueError, match=r"method='ode' does not use num_timesteps=5; it reads divergence, num_probes"):
        log_likelihood(pipe, images, "ode", num_timesteps=5)
    with pytest.raises(ValueError, match=r"method='trajectory' does not use num_samples=4, divergence='exact'"):
        log_likelihood(pipe, images, "trajectory", num_samples=4, divergence="exact")
    with pytest.raises(ValueError, match=r"method='bound' does not use rtol=0.001"):
        pipe.log_likelihood(images, "bound", rtol=1e-3)
    torch.manual_seed(0)
    wrong = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=3))
    bad = HFDDPMPipeline(unet=wrong, scheduler=HFDDPMScheduler(num_train_timesteps=T))
    with pytest.raises(ValueError, match=r"output has shape \(1, 3, 8, 8\).*needs \(1, 1, 8, 8\)"):
        log_likelihood(bad, images, "ode", **FAST_ODE)


def test_a_split_resumes_from_its_finished_blocks(pipe, tmp_path):
    images = digits(5)
    options = {"divergence": "rademacher", "num_probes": 2, **FAST_ODE}
    first = likelihood_over_split(pipe, images, "ode", options=options, block_size=2, seed=4, block_dir=tmp_path)
    blocks = sorted(tmp_path.glob("block-*.npz"))
    assert [p.name for p in blocks] == ["block-00000.npz", "block-00001.npz", "block-00002.npz"]
    kept = {p.name: p.stat().st_mtime_ns for p in blocks[:2]}
    blocks[2].unlink()
    again = likelihood_over_split(pipe, images, "ode", options=options, block_size=2, seed=4, block_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(tmp_path.glob("block-*.npz"))[:2]} == kept  # not redone
    assert again.value == first.value and again.stderr == first.stderr and again.count == 5
    assert first.name == "bits_per_dim_ode" and first.details["nfe_per_image"]["mean"] > 0
    with pytest.raises(ValueError, match=r"other settings \(differing: \['options'\]\)"):
        likelihood_over_split(pipe, images, "ode", options={**options, "num_probes": 3}, block_size=2, seed=4,
                              block_dir=tmp_path)  # fmt: skip


def test_kept_blocks_are_never_taken_for_another_models_or_other_images(pipe, tmp_path, monkeypatch):
    """A --likelihood_dir of one model or split given to another (or its images changed since) is refused naming what
    differs, never printed as this run's result; the default cache, which no one chose, keys by both and recomputes."""
    from hf_ddpm.cli import main as cli_main

    images, options = digits(4), {"num_trajectories": 2}
    kept = {"block_size": 2, "seed": 0, "block_dir": tmp_path / "blocks"}
    first = likelihood_over_split(pipe, images, "trajectory", options=options, **kept)
    other = make_pipe()
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)  # other weights, the same config
    with pytest.raises(ValueError, match=r"other settings \(differing: \['model'\]\)"):
        likelihood_over_split(other, images, "trajectory", options=options, **kept)
    with pytest.raises(ValueError, match=r"other settings \(differing: \['images'\]\)"):
        likelihood_over_split(pipe, 255 - images, "trajectory", options=options, **kept)  # the files changed
    assert likelihood_over_split(pipe, images, "trajectory", options=options, **kept).value == first.value

    # the command line's default cache (under HF_DDPM_CACHE's parent): images changed since get their own result
    monkeypatch.setenv("HF_DDPM_CACHE", str(tmp_path / "cache" / "reference_statistics"))
    folder, path = tmp_path / "images", tmp_path / "pipeline"
    pipe.save_pretrained(path)
    values = []
    for shade in (40, 200):
        folder.mkdir(exist_ok=True)
        for i in range(4):  # 3 held out, 1 to train on
            Image.new("L", (8, 8), shade + 10 * i).save(folder / f"{i}.png")
        metrics = tmp_path / f"metrics-{shade}.json"
        argv = ["evaluate", str(path), "--train_data_dir", str(folder), "--eval_size", "3", "--likelihood", "iw",
                "--iw_samples", "2", "--num_samples", "0", "--metrics_out", str(metrics)]  # fmt: skip
        assert cli_main(argv) == 0
        values.append(json.loads(metrics.read_text())["bits_per_dim_iw"]["value"])
    assert values[0] != values[1] and len(list((tmp_path / "cache" / "likelihood").iterdir())) == 2


def test_evaluate_command_writes_one_entry_per_method(tmp_path):
    path = tmp_path / "pipeline"
    make_pipe().save_pretrained(path)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", str(path), "--num_images", "3", "--batch_size", "2", "--likelihood",
            "bound,trajectory,iw,ode,rate_distortion", "--num_trajectories", "4", "--iw_samples", "2", "--rtol", "1e-3",
            "--atol", "1e-3", "--likelihood_dir", str(tmp_path / "blocks"), "--metrics_out", str(out)]  # fmt: skip
    metrics = evaluate(build_parser().parse_args(argv))
    written = json.loads(out.read_text())
    names = ["bits_per_dim", "bits_per_dim_trajectory", "bits_per_dim_iw", "bits_per_dim_ode", "rate_distortion"]
    assert [m.name for m in metrics] == names and sorted(written) == sorted(names)
    assert written["bits_per_dim_iw"]["num_samples"] == 2 and "upper bound" in written["bits_per_dim_ode"]["bounds"]
    # one schema: every entry, the bound's too, names its method and what its number bounds
    assert [written[n]["method"] for n in names] == ["bound", "trajectory", "iw", "ode", "rate_distortion"]
    assert written["bits_per_dim"]["bounds"] == "upper bound on -log2 P(x)/D (DDPM eq. 5)"
    assert len(written["rate_distortion"]["rate_bits_per_dim"]) == T + 1
    assert written["rate_distortion"]["value"] == pytest.approx(written["bits_per_dim"]["value"], rel=1e-12)
    assert np.isfinite(written["bits_per_dim_ode"]["nfe_per_image"]["mean"])
    for bad, match in ((["--likelihood", "bound,exact"], "unknown methods \\['exact'\\]"),
                       (["--iw_samples", "0"], "--iw_samples must be >= 1, got 0"),
                       (["--likelihood", "rate_distortion", "--num_timesteps", "8", "--iw_samples", "2"],
                        r"--likelihood rate_distortion reads none of --num_timesteps \(read by bound\), --iw_samples "
                        r"\(read by iw\): drop it, or add its method"),
                       (["--likelihood", "trajectory", "--divergence", "exact"],
                        r"reads none of --divergence \(read by ode\)")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            evaluate(build_parser().parse_args(["evaluate", str(path), *bad]))


def test_the_model_card_lists_whichever_likelihoods_were_run(tmp_path):
    from hf_ddpm.evaluation.schema import read_metrics, write_metrics
    from hf_ddpm.model_card import collect_metrics

    pipe, images = make_pipe(), digits(2)
    metrics = [likelihood_over_split(pipe, images, m, options=FAST_ODE if m == "ode" else {}, block_size=2)
               for m in ("ode", "trajectory")]  # fmt: skip
    write_metrics(tmp_path / "m.json", metrics)
    entries = {m.name: m.to_dict() for m in read_metrics(tmp_path / "m.json")}
    rows = {row["type"]: row for row in collect_metrics(None, entries)}
    assert sorted(rows) == ["bits_per_dim_ode", "bits_per_dim_trajectory"]  # only what was run
    ode = rows["bits_per_dim_ode"]
    assert ode["number"] == round(metrics[0].value, 4) and "probability-flow ODE" in ode["name"]
    assert "dequantization" in ode["details"] and "2 images" in ode["details"]


def test_the_gpu_likelihood_section_runs_on_a_stand_in(pipe):
    from benchmarks.likelihood import cifar10

    result = cifar10("smoke", device="cpu", pipe=pipe, images=digits(2))
    assert result["bound"]["count"] == 2 and result["bound"]["paper"] == 3.75 and np.isfinite(result["bound"]["value"])
    assert result["ode"]["count"] == 1 and result["ode"]["paper"] == 3.28 and result["ode"]["nfe_per_image"]["max"] > 0
