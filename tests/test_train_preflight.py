"""Everything checked before any work: a UNet that cannot take the resolution or whose JSON config is broken, a Hub
repo id that cannot exist, an unreachable remote dataset: each refused in seconds, before any data is read and
before anything is written, naming the flag or the file and key. Defaults that fit a short run. One readable error
line, also under `accelerate launch`."""

import json
import logging
import re
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from training_runs import REPO, environment, launch_command

from hf_ddpm.hub import HubPushError
from hf_ddpm.training import parse_args, train
from hf_ddpm.training.main import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py
SHORT = ["--model_config", "test-tiny", "--resolution", "8", "--ddpm_num_steps", "50", "--eval_size", "2",
         "--eval_num_images", "2", "--eval_num_timesteps", "2", "--eval_batch_size", "2"]  # fmt: skip


def refused(tmp_path, argv, match, error=ValueError):
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(error, match=match):
        train(parse_args(["--output_dir", str(out), *argv]))
    assert time.monotonic() - started < 10
    assert not out.exists()  # nothing written, not even the directory


def test_a_refused_run_leaves_no_folder_of_a_new_nested_output_dir(tmp_path):
    out = tmp_path / "new" / "runs" / "out"
    with pytest.raises(ValueError, match="is not a directory"):
        train(parse_args(["--output_dir", str(out), "--train_data_dir", str(tmp_path / "missing"), *SHORT]))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even new/ or new/runs/


@pytest.mark.parametrize("resolution", [15, 17])
def test_a_resolution_the_unet_cannot_take_is_refused_naming_the_accepted_ones(tmp_path, no_data, resolution):
    match = (rf"--resolution {resolution}: the UNet of --model_config digits-16-tiny cannot take {resolution}x"
             rf"{resolution} images \(RuntimeError: .*\). It halves the resolution 2 times, so it accepts multiples "
             r"of 4: 4, 8, 12, 16, ...")  # fmt: skip
    refused(tmp_path, ["--model_config", "digits-16-tiny", "--resolution", str(resolution)], match)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"layers_per_block": 0}, r"layers_per_block must be an integer >= 1, got 0"),
        ({"block_out_channels": [-8, 16]}, r"block_out_channels must be a list of positive integers, got \[-8, 16\]"),
        ({"down_block_types": ["DownBlock2D", "FancyBlock2D"]}, r"\(key down_block_types\): FancyBlock2D does not"),
        ({"norm_num_groups": 3}, r"\(key norm_num_groups\): num_channels \(8\) must be divisible by num_groups \(3\)"),
        ({"layers_per_blok": 1}, r"unknown key\(s\) layers_per_blok; UNet2DModel takes "),
        (None, r"is not valid JSON: Expecting ',' delimiter \(line 1 column"),
    ],
)
def test_a_broken_unet_json_is_refused_naming_the_file_and_key(tmp_path, no_data, change, match):
    from hf_ddpm.unet import unet_config

    path = tmp_path / "unet.json"
    text = json.dumps({**unet_config("test-tiny"), **(change or {})})
    path.write_text(text if change is not None else text.replace(", ", " ", 1))  # a comma dropped
    refused(tmp_path, ["--model_config", str(path), "--resolution", "8"], rf"--model_config {path}.*{match}")


def test_bad_hub_repo_ids_are_refused_before_training(tmp_path, no_data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    refused(tmp_path, [*SHORT, "--push_to_hub", "--hub_model_id", "a/b/c"],
            r"--hub_model_id 'a/b/c' is not a valid Hub repo id: Repo id must be in the form")  # fmt: skip
    out = tmp_path / "my run (v2)"
    with pytest.raises(ValueError, match=r"the repo id 'my run \(v2\)' \(from --output_dir's name\) is not a valid "
                                         r"Hub repo id.*Pass --hub_model_id NAME"):  # fmt: skip
        train(parse_args(["--output_dir", str(out), *SHORT, "--push_to_hub"]))
    assert not out.exists()


def test_the_push_target_is_said_at_start_up(tmp_path, no_data, monkeypatch, caplog):
    from hf_ddpm.hub import check_repo_id

    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    args = parse_args(["--output_dir", str(tmp_path / "digits-ddpm"), "--push_to_hub"])
    with caplog.at_level(logging.INFO, logger="hf_ddpm.hub"):
        assert check_repo_id(args) == "digits-ddpm"
    assert "--push_to_hub: will push the pipeline to " in caplog.text and "/<your namespace>/digits-ddpm" in caplog.text


@pytest.mark.parametrize("offline", [False, True])
def test_push_to_hub_without_a_token_or_offline_says_how_to_train_and_push(tmp_path, no_data, monkeypatch, offline):
    """At training's door the push guards speak of a run not yet trained: how to train and push, or to push the
    output directory once trained (not "push <output_dir>", nor "nothing was sent (<output_dir> is as it was)")."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    later = (
        f"or train without --push_to_hub and push the result later with: python -m hf_ddpm push {out} --repo_id me/x"
    )
    if offline:
        said = ("--push_to_hub: HF_HUB_OFFLINE is set, so hf_ddpm does not push; nothing was trained. Unset "
                f"HF_HUB_OFFLINE to train and push, {later}")  # fmt: skip
    else:
        said = ("--push_to_hub: no Hugging Face token; nothing was trained. Pass --hub_token, set HF_TOKEN, or run "
                f"`hf auth login` to train and push, {later}")  # fmt: skip
    refused(tmp_path, [*SHORT, "--push_to_hub", "--hub_model_id", "me/x"], f"^{re.escape(said)}$", HubPushError)


def test_a_checkpoint_name_in_a_directory_without_checkpoints_says_there_are_none(tmp_path, no_data):
    out = tmp_path / "out"
    said = (f"--resume_from_checkpoint 'checkpoint-7': no such checkpoint directory (nor in {out}); {out} holds no "
            "checkpoints: name a checkpoint directory that exists, or pass 'latest' (which starts a new run when "
            "there is none)")  # fmt: skip
    refused(tmp_path, [*SHORT, "--resume_from_checkpoint", "checkpoint-7"], f"^{re.escape(said)}$")


class SilentServer:
    """A port that accepts connections (the kernel's backlog does) and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_dataset_fails_in_seconds_naming_the_network(tmp_path, no_data, monkeypatch, kind):
    from huggingface_hub import constants

    if kind == "silent":
        server = SilentServer()
        port = server.port
    else:
        with socket.socket() as s:  # bound, then closed: nothing listens there
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reason = "Connection refused" if kind == "refused" else "no answer within 5 s"
    match = (rf"--dataset_name someone/images: the Hugging Face Hub at http://127.0.0.1:{port} cannot be reached "
             rf"\(.*{reason}.*\): a network problem, not the dataset. .*HF_HUB_OFFLINE=1.*local copy")  # fmt: skip
    started = time.monotonic()
    refused(tmp_path, [*SHORT, "--dataset_name", "someone/images"], match, ConnectionError)
    assert time.monotonic() - started < 15


def test_a_hub_that_answers_is_left_to_datasets(monkeypatch, hub):
    """Any HTTP answer (here the local Hub server's 404 for an unknown dataset) means the network works: the probe
    passes, and datasets reports what is wrong with the name."""
    from huggingface_hub import constants

    from hf_ddpm.hub_probe import check_dataset_reachable

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_dataset_reachable(parse_args(["--dataset_name", "someone/no-such-dataset"]).dataset_name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cache is read, nothing is probed
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    check_dataset_reachable(parse_args(["--dataset_name", "someone/no-such-dataset"]).dataset_name)


def image_folder(path, count):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_defaults_fit_a_small_folder_and_a_short_run(tmp_path, caplog):
    """No --train_batch_size, --lr_warmup_steps or --ddpm_num_inference_steps: a 10-image folder (9 to train)
    trains with the batch capped at 9, the warmup shortened to a tenth of the 6-step run, grids of T = 20 steps."""
    folder = image_folder(tmp_path / "images", 10)
    argv = ["--output_dir", str(tmp_path / "out"), "--train_data_dir", str(folder), "--model_config", "test-tiny",
            "--ddpm_num_steps", "21", "--eval_size", "1", "--eval_num_images", "1", "--eval_num_timesteps", "2",
            "--eval_batch_size", "1", "--num_epochs", "6"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        summary = train(parse_args(argv))
    assert summary["images_per_optimizer_step"] == 9 and summary["optimizer_steps"] == 6
    assert "--train_batch_size 9 (the default 64, capped: 9 training images over 1 processes)" in caplog.text
    assert "--lr_warmup_steps 0 (the default 100 is longer than the run's 6 steps: a tenth of it)" in caplog.text
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert (saved["train_batch_size"], saved["lr_warmup_steps"], saved["ddpm_num_inference_steps"]) == (9, 0, 21)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--train_batch_size", "64"], r"the training split has 9 images, fewer than one global batch of 64"),
        (["--lr_warmup_steps", "100"], r"--lr_warmup_steps 100 exceeds the run's 6 optimizer steps"),
        (["--ddpm_num_inference_steps", "250"], r"--ddpm_num_inference_steps 250 exceeds the 21 training timesteps"),
    ],
)
def test_explicit_values_that_do_not_fit_stay_errors(tmp_path, extra, match):
    folder = image_folder(tmp_path / "images", 10)
    argv = ["--output_dir", str(tmp_path / "out"), "--train_data_dir", str(folder), "--model_config", "test-tiny",
            "--ddpm_num_steps", "21", "--eval_size", "1", "--num_epochs", "6", *extra]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        train(parse_args(argv))
    assert not (tmp_path / "out").exists()


def test_a_recipes_warmup_longer_than_the_run_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """--config ddpm-cifar10 warms up over 5000 steps: with --max_train_steps 2 the run's length is known at the
    door, so the refusal comes before any image is decoded (not after a cache build)."""
    monkeypatch.setattr("hf_ddpm.training.main.load_training_data", lambda *a, **k: pytest.fail("the data was read"))
    argv = ["--config", "ddpm-cifar10", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
            "--train_data_dir", str(image_folder(tmp_path / "images", 4))]  # fmt: skip
    with pytest.raises(ValueError, match=r"--lr_warmup_steps 5000 exceeds the run's 2 optimizer steps"):
        train(parse_args(argv))
    assert not (tmp_path / "out").exists()


def run_cli(command, **env):
    return subprocess.run(command, cwd=REPO, env=environment() | env, capture_output=True, text=True, timeout=300)


def test_an_error_ends_the_output_with_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
    """training/train.py's `main` (in this process: the subprocess case is the next test)."""
    argv = ["--output_dir", str(tmp_path / "out"), "--model_config", "digits-16-tiny", "--resolution", "15"]
    assert main(argv) == 1
    plain = capsys.readouterr().err
    last = plain.strip().splitlines()[-1]
    assert last.startswith("error: --resolution 15: the UNet of --model_config digits-16-tiny cannot take 15x15")
    assert "Traceback" not in plain and plain.count("error: ") == 1
    assert main([*argv, "--debug"]) == 1
    debug = capsys.readouterr().err
    assert "Traceback (most recent call last)" in debug and debug.count("error: ") == 1  # with its cause: torch's
    assert debug.strip().splitlines()[-1] == last


def test_under_accelerate_launch_the_error_line_is_printed_once(tmp_path):
    """`accelerate launch` adds its report of the failed command after our line (its CalledProcessError);
    `accelerate launch --quiet` leaves our line last."""
    argv = ["--output_dir", str(tmp_path / "out"), "--model_config", "digits-16-tiny", "--resolution", "15"]
    command = launch_command(argv)
    quiet = run_cli(command[:3] + ["--quiet"] + command[3:])
    assert quiet.returncode == 1, quiet.stderr[-3000:]
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: --resolution 15: the UNet")
    assert quiet.stderr.count("error: --resolution 15") == 1 and "Traceback" not in quiet.stderr


@pytest.mark.slow  # ~40 s on two busy cores: the 20 steps are quick, the end-of-run grid and bits/dim are not
def test_max_train_steps_20_with_every_other_flag_default_trains(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), "--max_train_steps", "20"],
                            cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--lr_warmup_steps 2 (the default 100 is longer than the run's 20 steps" in result.stderr
    assert (tmp_path / "ddpm-model" / "model_index.json").exists()


@pytest.mark.slow  # 40 epochs of a 9-image folder with the default grids (every 10 epochs, 250 steps)
def test_a_10_image_folder_with_no_other_flag_trains(tmp_path):
    folder = image_folder(tmp_path / "images", 10)
    result = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), "--train_data_dir", str(folder)],
                            cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--train_batch_size 9 (the default 64, capped" in result.stderr
    assert (tmp_path / "ddpm-model" / "model_index.json").exists()
