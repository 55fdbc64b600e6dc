"""What a newcomer meets at the door of training/train.py and in its log: an unknown flag is one line naming the
nearest flag and the usage; a revoked Hub token with --push_to_hub is refused before anything trains (the Hub answers
whoami: tests/hub_server.py); the log names the model that trains (preset or file, parameters, resolution, T,
schedule), says when the default preset is smaller than the images, and the final bits/dim and sample grid show a
progress bar with a count."""

import re
import subprocess
import sys
import time

import httpx
import pytest
from hub_server import HubServer
from huggingface_hub.errors import HfHubHTTPError
from training_runs import REPO, environment, launch_command, reset_accelerate, tiny

from hf_ddpm.hub import HubPushError, check_token
from hf_ddpm.training import parse_args, train
from hf_ddpm.training.main import main


def test_an_unknown_flag_is_one_line_naming_the_nearest_and_the_usage(capsys):
    assert main(["--output-dirx", "out"]) == 2  # training/train.py's main (hf_ddpm.train.main)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [
        "training/train.py: error: unrecognized flag --output-dirx (did you mean --output_dir?)",
        "usage: training/train.py [options]   (--help describes every flag)",
    ], captured.err


def test_a_flag_prefix_is_an_unknown_flag_as_in_a_config_file(capsys):
    """argparse would read --max_train_step as --max_train_steps (and fail once another flag shared the prefix);
    the same key in a --config file is refused, so the command line refuses it too, naming the flag."""
    assert main(["--max_train_step", "3"]) == 2
    said = capsys.readouterr().err.splitlines()[0]
    assert said == "training/train.py: error: unrecognized flag --max_train_step (did you mean --max_train_steps?)"


def test_the_script_says_it_is_starting_before_the_seconds_of_its_imports():
    """Importing torch, diffusers and accelerate takes seconds: the script's first line comes before them, once per
    launch (rank 0's), and nothing of it reaches a later rank."""
    command = [sys.executable, "-X", "importtime", str(REPO / "training" / "train.py"), "--output-dirx", "out"]
    for rank, said in (("0", True), ("1", False)):
        result = subprocess.run(command, cwd=REPO, env=environment() | {"RANK": rank}, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        banner = "training/train.py: starting (importing torch, diffusers and accelerate) ..."
        assert (lines[0] == banner) == said and result.stderr.count(banner) == said, result.stderr[-2000:]
        if said:  # -X importtime writes each import as it ends: the line precedes torch's
            torch = re.search(r"\| +torch$", result.stderr, re.MULTILINE)
            assert torch and result.stderr.index(banner) < torch.start(), result.stderr[:2000]


@pytest.mark.parametrize(
    "flag,value,line",
    [
        ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0, got nan"),
        ("--learning_rate", "inf", "--learning_rate must be a finite number >= 0, got inf"),
        ("--adam_beta1", "1.5", "--adam_beta1 must be < 1, got 1.5 (allowed: [0, 1))"),
        ("--adam_beta1", "nan", "--adam_beta1 must be a finite number in [0, 1), got nan"),
        ("--adam_beta2", "1.0", "--adam_beta2 must be < 1, got 1.0 (allowed: [0, 1))"),
        ("--adam_epsilon", "-1", "--adam_epsilon must be > 0, got -1.0"),
        ("--max_grad_norm", "nan", "--max_grad_norm must be a finite number >= 0, got nan"),
        ("--ema_inv_gamma", "0", "--ema_inv_gamma must be > 0, got 0.0"),
        ("--ema_power", "-1", "--ema_power must be > 0, got -1.0"),
        ("--ema_max_decay", "1.5", "--ema_max_decay must be <= 1, got 1.5 (allowed: [0, 1])"),
        ("--dropout", "nan", "--dropout must be a finite number in [0, 1), got nan"),
        ("--dropout", "1", "--dropout must be < 1, got 1.0 (allowed: [0, 1))"),
        ("--seed", "-1", "--seed must be >= 0, got -1 (allowed: [0, 4294967295])"),
        ("--seed", str(2**32), "--seed must be <= 4294967295, got 4294967296 (allowed: [0, 4294967295])"),
        ("--max_in_memory_gb", "nan", "--max_in_memory_gb must be a finite number >= 0, got nan"),
    ],
)
def test_an_optimizer_or_ema_value_out_of_range_is_refused_at_the_door(tmp_path, capsys, flag, value, line):
    """Each would reach torch or diffusers (a message naming no flag) after the output directory was written."""
    out = tmp_path / "out"
    assert main([flag, value, "--output_dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {line}"], captured.err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,line",
    [
        (["--ddpm_num_steps", "100", "--num_train_timesteps", "200"],
         "--ddpm_num_steps 100 and --num_train_timesteps 200 set one option, --ddpm_num_steps, to different values: "
         "pass one"),
        (["--num_images", "8", "--eval_num_images", "16"],
         "--num_images 8 and --eval_num_images 16 set one option, --eval_num_images, to different values: pass one"),
        (["--use_ema", "--no-use_ema"], "--use_ema and --no-use_ema set one option, --use_ema, to different values: "
                                        "pass one"),
        (["--streaming", "--dataset_name", "someone/images", "--max_train_steps", "5", "--max_train_samples", "100"],
         "--max_train_samples 100 does not apply with --streaming (a stream is read as it comes, no subset is drawn "
         "from it): drop it, or train without --streaming"),
        (["--streaming", "--dataset_name", "someone/images", "--max_train_steps", "5", "--max_in_memory_gb", "2"],
         "--max_in_memory_gb 2.0 does not apply with --streaming (a stream is decoded as it comes, a batch ahead, and "
         "never held in memory): drop it, or train without --streaming"),
        (["--streaming", "--train_data_dir", "images", "--max_train_steps", "5", "--preprocessing_num_workers", "4"],
         "--preprocessing_num_workers 4 does not apply with --streaming (a stream builds no cache; "
         "--dataloader_num_workers decodes it in processes): drop it, or train without --streaming"),
        (["--dataloader_num_workers", "4"],
         "--dataloader_num_workers 4 applies only with --streaming (a preprocessed dataset is decoded once, into its "
         "cache; --preprocessing_num_workers decodes it in processes): drop it, or stream the data with --streaming"),
        (["--shuffle_buffer_size", "100"],
         "--shuffle_buffer_size 100 applies only with --streaming (a preprocessed dataset is shuffled whole, each "
         "epoch): drop it, or stream the data with --streaming"),
        (["--streaming", "--train_data_dir", "images", "--max_train_steps", "5", "--random_crop"],
         "--random_crop does not apply with --streaming (a streamed image is cropped at its centre): drop it, or "
         "train without --streaming"),
    ],
)  # fmt: skip
def test_options_that_contradict_or_do_nothing_are_refused_at_the_door(tmp_path, capsys, no_data, argv, line):
    """Two names of one option with different values (argparse would take the last in silence), and the options a
    stream does not apply (it would train on every image, centre-cropped, decoded as it comes, in silence)."""
    out = tmp_path / "out"
    assert main([*argv, "--output_dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {line}"], captured.err
    assert not out.exists()


def test_a_token_the_hub_refuses_is_named_with_the_way_out(tmp_path, monkeypatch):
    """check_token's message for a 401 (the real request: the slow test below, against the local Hub)."""
    import huggingface_hub

    def refused(token, cache):
        request = httpx.Request("GET", "https://hub.example/api/whoami-v2")
        raise HfHubHTTPError("401 Unauthorized", response=httpx.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "whoami", refused)
    config = parse_args(["--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_token", "hf_Revoked"])
    with pytest.raises(HubPushError, match=r"refuses --hub_token \(HTTP 401: invalid or revoked\); nothing was "
                       r"trained\. .*push the result later with: python -m hf_ddpm push") as refusal:  # fmt: skip
        check_token(config)
    assert "hf_Revoked" not in str(refusal.value)


@pytest.mark.slow  # a new process (the Hub endpoint is read at import) and the local Hub: about 30 s
def test_a_revoked_hub_token_is_refused_before_training(tmp_path):
    server = HubServer(tmp_path, token="hf_TheOnlyValidToken")
    try:
        out = tmp_path / "out"
        argv = tiny(out, "--push_to_hub", "--hub_model_id", "test-user/run", "--hub_token", "hf_RevokedToken")
        env = server.env(tmp_path, None) | {"PYTHONPATH": str(REPO)}
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), *argv], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        took = time.monotonic() - started
        requests = [(r["method"], r["path"]) for r in server.requests()]
    finally:
        server.stop()
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: --push_to_hub: the Hub at {server.url} refuses --hub_token (HTTP 401: invalid or revoked); nothing "
        "was trained. Pass a valid --hub_token or log in again (hf auth login), or train without --push_to_hub and "
        "push the result later with: python -m hf_ddpm push"
    ), last
    assert "hf_RevokedToken" not in result.stderr + result.stdout
    assert requests == [("GET", "/api/whoami-v2")]  # nothing created or uploaded
    assert not out.exists() and took < 120, took  # before any data is read or anything written


def test_the_log_names_the_model_and_the_final_evaluation_shows_progress(tmp_path, caplog, capsys):
    reset_accelerate()
    with caplog.at_level("INFO"):
        train(parse_args(tiny(tmp_path / "out", "--resolution", "16", model=())))  # no --model_config
    (line,) = [r.getMessage() for r in caplog.records if "model: " in r.getMessage()]
    assert line.endswith(
        "model: the digits-16-tiny preset (the default: no --model_config given), 0.81M parameters, 16x16 px, "
        "1 channel(s); T = 50, linear schedule, epsilon prediction, fixed_small variance, loss simple"
    ), line  # the preset's own size: no note
    err = capsys.readouterr().err
    # each bar ends with its count complete (the main process: the only one here)
    assert "step 2: held-out bits/dim (4 images, bound terms): 100%" in err, err[-2000:]
    assert "step 2: sample grid (2 images, denoising steps): 100%|" in err and "4/4 [" in err, err[-2000:]

    reset_accelerate()
    with caplog.at_level("INFO"):
        train(parse_args(tiny(tmp_path / "big", "--resolution", "32", "--max_train_steps", "1", model=())))
    (line,) = [r.getMessage() for r in caplog.records if "model: " in r.getMessage() and "32x32" in r.getMessage()]
    assert line.endswith(
        "Note: the digits-16-tiny preset is made for 16 px images; at 32 px pass --model_config (ddpm-cifar10-32, a "
        "JSON config) for a model of that size"
    ), line


@pytest.mark.slow  # a 2-process launch: about 40 s on a busy machine
@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--output-dirx", "x"],
            "training/train.py: error: unrecognized flag --output-dirx (did you mean --output_dir?)",
        ),
        (["--model_config", "no-such-model"], "error: --model_config 'no-such-model' is neither a preset"),
    ],
)
def test_quiet_under_multi_gpu_prints_an_error_every_process_meets_once(tmp_path, flags, line):
    command = launch_command([*flags, "--output_dir", str(tmp_path / "out")], num_processes=2)
    command = command[:3] + ["--quiet"] + command[3:]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    errors = [entry for entry in log.splitlines() if "error: " in entry]
    assert len(errors) == 1 and errors[0].startswith(line), log[-3000:]  # rank 0's; rank 1 held it back
    assert "Traceback" not in log, log[-3000:]


def test_a_cache_dir_under_a_file_is_refused_at_the_door_naming_the_flag(tmp_path, capsys):
    """It failed after the model was built, in one line that named neither the flag nor the fix (`[Errno 20] Not a
    directory: …`). An existing directory is used as it is: a built cache on read-only storage is only read."""
    (tmp_path / "a_file").write_text("not a directory")
    out, cache = tmp_path / "out", tmp_path / "a_file" / "cache"
    assert main(["--cache_dir", str(cache), "--output_dir", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: --cache_dir {cache}: {tmp_path / 'a_file'} is a file, so no directory can be made under it; pass "
        "another path"
    ]
    assert not out.exists()
