"""`python -m hf_ddpm evaluate` and the files it reads, under faults and contradictory input, as real processes: the
data flags typed win over the run's training_args.json (an RGB folder is never scored as grayscale); a model whose
channels differ from the data is refused before any work; every count the metrics need (FID >= 2 samples, k-NN
k < count) is checked before sampling; a corrupt --fid_reference is named (never with advice to allow pickles); a
truncated cached reference-statistics .npz is named and computed again; a truncated UNet safetensors file is named
as incomplete, by every loader."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from evaluation_stand_in import PixelFeatures
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.evaluation.reference import cached_reference

REPO = Path(__file__).resolve().parents[1]
T, SIZE = 50, 16
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def save_model(path: Path, channels: int) -> Path:
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=channels, out_channels=channels))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation_faults")
    gray, rgb = root / "gray", root / "rgb"
    gray.mkdir(), rgb.mkdir()
    for i in range(10):
        Image.new("L", (20, 20), 20 * i).save(gray / f"{i}.png")
        Image.new("RGB", (20, 20), (20 * i, 200 - 10 * i, 7)).save(rgb / f"{i}.png")
    return root, gray, rgb


def process_evaluate(*argv, timeout=300) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m hf_ddpm evaluate ARGV` in a process of its own: (its result, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "hf_ddpm", "evaluate", *map(str, argv)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return result, time.monotonic() - started


@pytest.fixture
def run_evaluate(capsys, monkeypatch):
    """The same command line (hf_ddpm.cli.main: parsing, the run, its `error:` line and status) in this process,
    which spares each case an interpreter start (~10 s under load); the process-tuning step is left out."""
    from hf_ddpm.cli import main

    monkeypatch.setattr("hf_ddpm.cpu.tune_process", lambda num_threads=None: None)

    def run(*argv):
        capsys.readouterr()
        started = time.monotonic()
        status = main(["evaluate", *map(str, argv)])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err), time.monotonic() - started

    return run


def test_typed_data_flags_win_over_training_args_json(folders, tmp_path, run_evaluate):
    root, gray, rgb = folders
    gray_run = save_model(tmp_path / "gray_run", 1)  # a grayscale model trained on the gray folder
    (gray_run / "training_args.json").write_text(json.dumps({"train_data_dir": str(gray), "eval_size": 3}))
    result, took = run_evaluate(gray_run, "--train_data_dir", rgb, "--num_timesteps", 2, "--cache_dir", tmp_path / "c")
    assert result.returncode == 1 and took < 120, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the data ({rgb}) has 3-channel images and the model takes 1: evaluate on the data the model was "
        "trained on (its training_args.json, or the data flags)"
    )  # the typed RGB folder, not converted to grayscale as the run's own data would be
    assert "bits/dim" not in result.stdout

    rgb_run = save_model(tmp_path / "rgb_run", 3)  # an RGB model whose run names a gray folder and a dataset
    (rgb_run / "training_args.json").write_text(json.dumps({"train_data_dir": str(gray), "eval_size": 3,
                                                            "image_column": "img", "seed": 1}))  # fmt: skip
    result, _ = run_evaluate(rgb_run, "--train_data_dir", rgb, "--num_timesteps", 2, "--cache_dir", tmp_path / "c")
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("bits/dim:")]
    assert f"held-out split of {rgb} (eval_size 3, seed 1)" in line  # the typed folder; the run's split options


def test_count_checks_come_before_any_sampling_or_bits_per_dim(folders, tmp_path, run_evaluate):
    root, gray, rgb = folders
    model = save_model(tmp_path / "model", 1)
    cases = {
        ("--num_samples", 1): "error: --num_samples 1: FID needs at least 2 samples (their covariance)",
        ("--num_samples", 3): "error: --num_samples 3: precision/recall measure each sample's distance to its k = "
        "3-th nearest other sample, so they need more than 3 samples; pass --num_samples 4 or more (or "
        "--fid_reference STATS.npz for FID alone)",
        ("--num_samples", 8, "--train_data_dir", gray, "--eval_size", 3): f"error: the held-out split of {gray} "
        "(eval_size 3, seed 0) has 3 image(s): the reference needs at least 2 (FID) and more than 3 (precision/"
        "recall's k-NN radii); hold out more images (--eval_size), raise --reference_count, or pass --fid_reference "
        "STATS.npz",
    }  # fmt: skip
    for flags, said in cases.items():
        samples = tmp_path / f"samples{len(flags)}_{flags[1]}"
        result, took = run_evaluate(model, *flags, "--sample_dir", samples, "--cache_dir", tmp_path / "c")
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == said, result.stderr[-2000:]
        assert took < 120 and not samples.exists() and "bits/dim" not in result.stdout  # nothing computed


def test_a_corrupt_fid_reference_is_named_and_never_met_with_advice_to_allow_pickles(tmp_path, run_evaluate):
    model = save_model(tmp_path / "model", 1)
    good = tmp_path / "good.npz"
    np.savez(good, mu=np.zeros(2048), sigma=np.eye(2048))
    truncated, pickled = tmp_path / "truncated.npz", tmp_path / "pickled.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled.write_bytes(pickle.dumps({"mu": [0.0], "sigma": [[1.0]]}))
    for path, why in ((truncated, "it is truncated or damaged (BadZipFile)"),
                      (pickled, "it holds pickled Python objects, which are never loaded")):  # fmt: skip
        samples = tmp_path / f"s-{path.stem}"
        result, _ = run_evaluate(model, "--num_images", 0, "--num_samples", 4, "--fid_reference", path,
                                 "--sample_dir", samples)  # fmt: skip
        assert result.returncode == 1 and not samples.exists(), result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: --fid_reference {path} cannot be read as an .npz of arrays: {why}. Make one with np.savez(path, "
            "mu=mu, sigma=sigma) from float arrays: mu (2048,), sigma (2048, 2048)"
        )
        assert "allow_pickle" not in result.stderr + result.stdout


def test_a_truncated_cached_reference_npz_is_named_and_computed_again(tmp_path, caplog):
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor, key = PixelFeatures(), {"data": "random", "split": "eval", "count": 12}
    first = cached_reference(key, extractor, lambda: images, "12 images", cache_dir=tmp_path)
    (npz,) = tmp_path.glob("*.npz")
    os.truncate(npz, npz.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.evaluation.reference"):
        again = cached_reference(key, extractor, lambda: images, "12 images", cache_dir=tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"the cached reference statistics {npz} cannot be read as an .npz of arrays: it is truncated or damaged "
        "(BadZipFile): computing them again"
    )
    assert again.computed and extractor.images_seen == 24
    np.testing.assert_array_equal(again.features, first.features)
    third = cached_reference(key, extractor, lambda: images, "12 images", cache_dir=tmp_path)
    assert not third.computed and extractor.images_seen == 24  # healed: read again


def test_a_truncated_unet_weights_file_is_named_as_incomplete_by_every_loader(tmp_path, run_evaluate):
    model = save_model(tmp_path / "model", 1)
    weights = model / WEIGHTS
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    said = (
        f"the UNet weights {weights} ({size // 2} bytes) are incomplete or corrupt (Error while deserializing "
        "header: incomplete metadata, file not fully covered): the file was not completely downloaded or saved. "
        "Download it again (force_download=True, or delete it from the Hugging Face cache) or save the pipeline "
        "again with save_pretrained"
    )
    with pytest.raises(OSError) as error:
        HFDDPMPipeline.from_pretrained(model)
    assert str(error.value) == said
    result, took = run_evaluate(model, "--num_timesteps", 2)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: {said}", result.stderr


@pytest.mark.slow  # three interpreter starts: about 40 s under load
def test_as_real_processes_the_refusals_come_in_seconds_with_one_error_line(folders, tmp_path):
    root, gray, rgb = folders
    gray_run = save_model(tmp_path / "gray_run", 1)
    (gray_run / "training_args.json").write_text(json.dumps({"train_data_dir": str(gray), "eval_size": 3}))
    npz = tmp_path / "truncated.npz"
    np.savez(npz, mu=np.zeros(2048), sigma=np.eye(2048))
    os.truncate(npz, npz.stat().st_size // 2)
    truncated = shutil.copytree(gray_run, tmp_path / "truncated_run")
    os.truncate(truncated / WEIGHTS, (truncated / WEIGHTS).stat().st_size // 2)
    result, took = process_evaluate(truncated, "--num_timesteps", 2)
    assert result.returncode == 1 and took < 180 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the UNet weights {truncated / WEIGHTS} (")
    cases = {
        ("--train_data_dir", rgb): f"error: the data ({rgb}) has 3-channel images and the model takes 1",
        ("--num_samples", 3): "error: --num_samples 3: precision/recall measure",
        ("--num_samples", 4, "--fid_reference", npz): f"error: --fid_reference {npz} cannot be read",
    }
    for flags, said in cases.items():
        result, took = process_evaluate(gray_run, *flags, "--sample_dir", tmp_path / "s", "--cache_dir", tmp_path / "c")
        assert result.returncode == 1 and took < 180, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(said) and "Traceback" not in result.stderr
        assert "bits/dim" not in result.stdout and not (tmp_path / "s").exists()


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model is the first work `evaluate` does: a refusal that must come at the door fails the test if
    it gets that far."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded: the flag was not checked at the door")

    monkeypatch.setattr(HFDDPMPipeline, "from_pretrained", loaded)


def test_a_device_this_machine_lacks_is_one_line_at_the_door(tmp_path, run_evaluate, monkeypatch, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, whatever runs the test
    cases = {
        "cuda": r"error: --device cuda: cuda is not available on this machine( \(this torch was built without CUDA\))?"
        r"; use cpu",
        "cuda:1": r"error: --device cuda:1: cuda is not available on this machine.*; use cpu",
        "bogus": r"error: --device 'bogus' is not a device torch can name; use cpu, cuda, cuda:N, mps or xpu",
        "meta": r"error: --device 'meta': evaluation runs on cpu, cuda, mps or xpu, not meta",
    }
    for device, said in cases.items():
        result, _ = run_evaluate(tmp_path / "model", "--num_timesteps", 2, "--device", device)
        assert result.returncode == 1 and re.fullmatch(said, result.stderr.strip()), result.stderr[-2000:]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: its index is checked too
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result, _ = run_evaluate(tmp_path / "model", "--num_timesteps", 2, "--device", "cuda:3")
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: --device cuda:3: this machine has 1 cuda device(s), cuda:0 to cuda:0"
    )


def test_the_seed_counts_and_resolution_name_their_flag_and_what_is_allowed(tmp_path, run_evaluate, no_work):
    cases = {
        ("--seed", -1): "error: --seed must be >= 0, got -1",
        ("--num_samples", -5): "error: --num_samples must be >= 0, got -5",  # 0 is allowed (no sample metrics)
        ("--resolution", 0): "error: --resolution must be >= 1, got 0",  # was read as "not given"
        ("--resolution", -4): "error: --resolution must be >= 1, got -4",
        ("--num_images", -1): "error: --num_images must be >= 0, got -1",
        ("--num_timesteps", 0): "error: --num_timesteps must be >= 1, got 0",
    }
    for flags, said in cases.items():
        result, _ = run_evaluate(tmp_path / "model", *flags)
        assert result.returncode == 1 and result.stderr.strip() == said, (flags, result.stderr[-2000:])


def test_paths_to_write_are_checked_at_the_door_naming_their_flag(tmp_path, run_evaluate, monkeypatch):
    folder, file = tmp_path / "a_folder", tmp_path / "a_file"
    folder.mkdir(), file.write_text("x")
    cases = {
        ("--metrics_out", folder): f"error: --metrics_out {folder} is a directory; pass the path of a JSON file, "
        f"e.g. {folder / 'metrics.json'}",
        ("--metrics_out", file / "sub" / "m.json"): f"error: --metrics_out {file / 'sub' / 'm.json'}: {file} is a "
        "file, so no file can be made under it; pass another path",
        ("--sample_dir", file): f"error: --sample_dir {file} is a file; pass a directory (an existing one, or a new "
        "one to make)",
        ("--likelihood_dir", file / "sub"): f"error: --likelihood_dir {file / 'sub'}: {file} is a file, so no "
        "directory can be made under it; pass another path",
    }  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(HFDDPMPipeline, "from_pretrained", lambda *a, **k: pytest.fail("not refused at the door"))
        for flags, said in cases.items():
            result, _ = run_evaluate(tmp_path / "model", "--num_timesteps", 2, *flags)
            assert result.returncode == 1 and result.stderr.strip() == said, (flags, result.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"] and not any(folder.iterdir())
    # a --metrics_out whose directories do not exist yet: made, as the file is written once the metrics are in
    model, out = save_model(tmp_path / "model", 1), tmp_path / "new" / "sub" / "m.json"
    result, _ = run_evaluate(model, "--num_timesteps", 2, "--num_images", 2, "--metrics_out", out)
    assert result.returncode == 0 and f"wrote {out}" in result.stdout, result.stderr[-2000:]
    assert json.loads(out.read_text())["bits_per_dim"]["count"] == 2


def test_a_command_past_the_door_says_what_it_loads_before_the_seconds_of_loading(tmp_path, run_evaluate, monkeypatch):
    """The imports and the model's load take seconds before the first progress bar: a line says what is happening
    once every flag is checked (a refusal at the door stays one line: the tests above pin it whole)."""
    loaded = []

    def from_pretrained(*args, **kwargs):
        loaded.append(args[0])
        raise OSError("stop here: the line must already be out")

    monkeypatch.setattr(HFDDPMPipeline, "from_pretrained", from_pretrained)
    (tmp_path / "model").mkdir()  # a folder: what is in it is the load's to check
    result, _ = run_evaluate(tmp_path / "model", "--num_timesteps", 2)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and loaded == [str(tmp_path / "model")], result.stderr
    assert lines == [f"evaluate: loading {tmp_path / 'model'} (importing diffusers and the data's readers) ...",
                     "error: stop here: the line must already be out"]  # fmt: skip
    monkeypatch.setenv("RANK", "1")  # another process of an accelerate launch: rank 0 alone says it
    result, _ = run_evaluate(tmp_path / "model", "--num_timesteps", 2)
    assert result.stderr.strip().splitlines() == ["error: stop here: the line must already be out"]


def test_a_training_args_json_that_is_not_json_is_named_at_the_door(tmp_path, run_evaluate, no_work):
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_args.json").write_text('{"dataset_name": ')  # edited by hand, say
    result, _ = run_evaluate(model, "--num_timesteps", 2)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {model / 'training_args.json'} is not valid JSON (Expecting value: line 1 column 18 (char 17)): the "
        "run's data options (its source, resolution, held-out split and seed) are read from it; fix the file"
    ), result.stderr


def test_ctrl_c_keeps_the_metrics_done_so_far_on_screen_and_ends_with_one_line(tmp_path, run_evaluate, monkeypatch):
    """Each metric is printed once it is done: a Ctrl-C in a later method (the ODE may take hours) loses none of the
    earlier ones, and ends with one line saying what a second run reuses (no traceback); nothing half-written."""
    from hf_ddpm.cli import INTERRUPTED

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_ddpm.evaluation.likelihood.likelihood_over_split", interrupted)
    model, out = save_model(tmp_path / "model", 1), tmp_path / "metrics.json"
    result, _ = run_evaluate(model, "--num_timesteps", 2, "--num_images", 4, "--likelihood", "bound,iw",
                             "--metrics_out", out)  # fmt: skip
    assert result.returncode == 128 + signal.SIGINT and "Traceback" not in result.stderr
    assert result.stdout.startswith("bits/dim: ") and "Monte Carlo, K = 2; 4 images of the held-out" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED and not out.exists()
