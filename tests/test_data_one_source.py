"""The data's rules, each in one home (hf_ddpm/data) and the same for training and `python -m hf_ddpm evaluate`:
one source at most (--dataset_name, --train_data_dir, --train_data_files), --train_data_files read as comma-separated
paths and globs, and --eval_size read as a count or a fraction."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.cli import build_parser
from hf_ddpm.data.sources import one_source
from hf_ddpm.evaluation.run import evaluate
from hf_ddpm.training import parse_args

SIZE = 16

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_training_refuses_two_sources_data_files_included():
    with pytest.raises(ValueError, match=r"^pass --train_data_dir \('d'\) or --train_data_files \('f'\), not both$"):
        parse_args(["--train_data_dir", "d", "--train_data_files", "f"])
    with pytest.raises(
        ValueError, match=r"^pass one of --dataset_name \('n'\) or --train_data_dir .* or --train_data_"
    ):
        parse_args(["--dataset_name", "n", "--train_data_dir", "d", "--train_data_files", "f"])
    assert one_source({"train_data_files": "f", "image_column": "x"}) == {"train_data_files": "f"}


@pytest.fixture
def run_on_files(tmp_path):
    """A training output directory whose run read --train_data_files (a glob): its pipeline and training_args.json."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((SIZE, SIZE), 20 * i, np.uint8)).save(folder / f"{i:02d}.png")
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    run_dir = tmp_path / "run"
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=50)).save_pretrained(run_dir)
    args = {"train_data_files": f"{folder}/*.png", "eval_size": 3, "seed": 1}
    (run_dir / "training_args.json").write_text(json.dumps(args))
    return run_dir, folder


def evaluate_args(*argv):
    return build_parser().parse_args(["evaluate", *map(str, argv)])


def test_evaluate_reads_the_data_files_a_run_trained_on(run_on_files, tmp_path):
    run_dir, folder = run_on_files
    (bpd,) = evaluate(evaluate_args(run_dir, "--num_timesteps", 2))
    assert bpd.count == 3 and f"12 files ({folder}/00.png, ...)" in bpd.protocol and "digits" not in bpd.protocol
    copy = tmp_path / "copy"  # typed here, a source replaces the run's
    shutil.copytree(folder, copy)
    (typed,) = evaluate(evaluate_args(run_dir, "--num_timesteps", 2, "--train_data_files", f"{copy}/0*.png"))
    assert typed.count == 3 and f"10 files ({copy}/00.png, ...)" in typed.protocol
    with pytest.raises(ValueError, match=r"pass --train_data_dir \('.*'\) or --train_data_files \('.*'\), not both"):
        evaluate(evaluate_args(run_dir, "--train_data_dir", folder, "--train_data_files", f"{folder}/*.png"))


def test_evaluate_reads_eval_size_as_training_does(run_on_files):
    run_dir, _ = run_on_files
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["evaluate"]._actions}
    assert actions["eval_size"].type("7") == 7 and actions["eval_size"].type("0.25") == 0.25
    with pytest.raises(ValueError, match=r"eval_size 1\.5 as a fraction must be in \[0, 1\); pass an int for a count"):
        evaluate(evaluate_args(run_dir, "--num_timesteps", 2, "--eval_size", "1.5"))  # not silently 1 image
