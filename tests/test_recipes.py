"""The papers' recipes (training/recipes/*.yaml, shipped as hf_ddpm/recipes): each value against a table of the
papers' settings written here independently of the files, the UNets' parameter counts, a citation on every line."""

import dataclasses
import json
import shlex
from pathlib import Path

import datasets
import numpy as np
import pytest
import tomllib
import torch
from diffusers import UNet2DModel
from PIL import Image
from training_runs import tiny

from hf_ddpm import unet_config
from hf_ddpm.training import parse_args, train
from hf_ddpm.training.cli import RECIPES_DIR, recipe_names
from hf_ddpm.training.model import build_scheduler
from hf_ddpm.training.resolve import RunFacts, resolve

ROOT = Path(__file__).resolve().parents[1]

# Ho, Jain & Abbeel 2020 (arXiv:2006.11239v2), Appendix B, and the authors' scripts/run_cifar.py and run_celebahq.py
# (warmup, clipping, variance); Nichol & Dhariwal 2021 (arXiv:2102.09672) with the flags released for its CIFAR-10
# L_hybrid model (openai/improved-diffusion README) and image_train.py's defaults.
DDPM = {
    "ddpm_num_steps": 1000,
    "ddpm_beta_schedule": "linear",
    "prediction_type": "epsilon",
    "loss": "simple",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "lr_warmup_steps": 5000,
    "max_grad_norm": 1.0,
    "ema_max_decay": 0.9999,
    "use_ema": True,
}
PAPERS = {
    "ddpm-cifar10": DDPM
    | {
        "model_config": "ddpm-cifar10-32",
        "resolution": 32,
        "dropout": 0.1,
        "learning_rate": 2e-4,
        "train_batch_size": 128,
        "random_flip": True,
        "max_train_steps": 800_000,
        "variance_type": "fixed_large",
    },
    "ddpm-celebahq-256": DDPM
    | {
        "model_config": "ddpm-celebahq-256",
        "resolution": 256,
        "dropout": 0.0,
        "learning_rate": 2e-5,
        "train_batch_size": 64,
        "random_flip": True,
        "max_train_steps": 500_000,
        "variance_type": "fixed_small",
    },
    "improved-ddpm-cifar10": {
        "model_config": "ddpm-cifar10-32",
        "resolution": 32,
        "dropout": 0.3,
        "ddpm_num_steps": 4000,
        "ddpm_beta_schedule": "cosine",
        "variance_type": "learned_range",
        "loss": "hybrid",
        "timestep_spacing": "linspace",
        "learning_rate": 1e-4,
        "train_batch_size": 128,
        "max_train_steps": 500_000,
        "lr_warmup_steps": 0,
        "max_grad_norm": 0.0,
        "adam_weight_decay": 0.0,
        "ema_max_decay": 0.9999,
        "random_flip": False,
    },
}
PARAMETERS_MILLIONS = {"ddpm-cifar10-32": (35.7, 1), "ddpm-celebahq-256": (114, 0)}  # App. B, as the paper rounds


def test_the_shipped_recipes_are_the_papers():
    assert recipe_names() == sorted(PAPERS)
    assert RECIPES_DIR == ROOT / "training" / "recipes"  # a checkout reads them where they are
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert project["package-dir"]["hf_ddpm.recipes"] == "training/recipes"  # ... and a wheel holds them
    assert "hf_ddpm.recipes" in project["packages"] and project["package-data"]["hf_ddpm.recipes"] == ["*.yaml"]


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_each_recipe_holds_the_papers_values(name):
    config = parse_args(["--config", name])
    assert {key: getattr(config, key) for key in PAPERS[name]} == PAPERS[name]
    by_path = parse_args(["--config", str(ROOT / "training" / "recipes" / f"{name}.yaml")])
    assert by_path == config


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_each_recipe_value_cites_its_source(name):
    text = (ROOT / "training" / "recipes" / f"{name}.yaml").read_text()
    papers_part = text.split("# not the paper's")[0]
    for line in papers_part.splitlines():
        if line and not line.startswith("#"):
            comment = line.partition("#")[2]
            assert any(s in comment for s in ("App.", "section", "eq.", ".py", "README", "see above")), line


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_the_recipes_schedules_are_the_papers(name):
    scheduler = build_scheduler(resolve(parse_args(["--config", name]), RunFacts())[0])
    betas = scheduler.betas.double()
    assert scheduler.config.num_train_timesteps == PAPERS[name]["ddpm_num_steps"] == len(betas)
    if PAPERS[name]["ddpm_beta_schedule"] == "linear":  # DDPM section 4: beta_1 = 1e-4 ... beta_T = 0.02, linear
        expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        torch.testing.assert_close(betas, expected, rtol=0, atol=1e-7)
    else:  # Improved DDPM eq. 17: alpha-bar_t = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008
        t = torch.arange(4001, dtype=torch.float64)
        f = torch.cos((t / 4000 + 0.008) / 1.008 * torch.pi / 2) ** 2
        expected = (1 - (f[1:] / f[0]) / (f[:-1] / f[0])).clamp(max=0.999)
        torch.testing.assert_close(betas, expected, rtol=0, atol=1e-6)
    assert scheduler.config.variance_type == PAPERS[name]["variance_type"]


@pytest.mark.parametrize("num_steps", [50, 100, 250])
def test_the_improved_recipe_samples_improved_ddpms_respaced_steps(num_steps):
    """improved_diffusion/respace.py space_timesteps(T, [n]): round(i (T - 1) / (n - 1)) for i < n, T - 1 and 0 kept."""
    scheduler = build_scheduler(resolve(parse_args(["--config", "improved-ddpm-cifar10"]), RunFacts())[0])
    scheduler.set_timesteps(num_steps)
    stride = (4000 - 1) / (num_steps - 1)
    expected = sorted({round(i * stride) for i in range(num_steps)}, reverse=True)
    assert scheduler.timesteps.tolist() == expected and expected[0] == 3999 and expected[-1] == 0


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_the_recipes_unets_have_the_papers_parameter_counts(name):
    config = parse_args(["--config", name])
    learned = config.variance_type == "learned_range"
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        unet = UNet2DModel.from_config(unet_config(config.model_config, learned, dropout=config.dropout))
    count = sum(p.numel() for p in unet.parameters())
    millions, digits = PARAMETERS_MILLIONS[config.model_config]
    extra = 3 * (3 * 3 * 128 + 1) if learned else 0  # learned_range: 3 more output channels of a 3x3 conv on 128
    assert round((count - extra) / 1e6, digits) == millions
    assert unet.config.out_channels == (6 if learned else 3) and unet.config.dropout == config.dropout


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_command_line_overrides_a_recipe_and_the_improved_recipe_trains(tmp_path, monkeypatch):
    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(24)]
    local = tmp_path / "data"
    datasets.Dataset.from_dict({"image": images}).save_to_disk(local)
    argv = ["--config", "improved-ddpm-cifar10", "--dataset_name", str(local), "--lr_warmup_steps", "0"]
    argv += ["--checkpointing_steps", "100", "--save_images_steps", "100", "--no-random_flip"]
    config = parse_args(tiny(tmp_path / "out", *argv, "--ddpm_num_steps", "40", "--eval_size", "4"))
    assert (config.train_batch_size, config.ddpm_num_steps, config.loss, config.dropout) == (4, 40, "hybrid", 0.3)
    given = dataclasses.replace(config)
    summary = train(config)
    assert config == given  # what was given is never changed: the run trains with its resolved copy
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert (saved["variance_type"], saved["ddpm_beta_schedule"], saved["lr_warmup_steps"]) == (
        "learned_range",
        "cosine",
        0,
    )
    assert summary["optimizer_steps"] == 2 and np.isfinite(summary["eval"]["bits_per_dim"])
    pipeline_config = (tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text()
    assert '"variance_type": "learned_range"' in pipeline_config and '"squaredcos_cap_v2"' in pipeline_config


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_num_epochs_on_the_command_line_trains_that_many_epochs_not_the_recipes_steps(tmp_path):
    """`--config ddpm-cifar10 --num_epochs 1` trained the recipe's 800000 steps, and its training_args.json held both
    lengths: the flag replaces the recipe's --max_train_steps (cli.REPLACES)."""
    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(24)]
    local = tmp_path / "data"
    datasets.Dataset.from_dict({"image": images}).save_to_disk(local)
    out = tmp_path / "out"
    argv = ["--config", "ddpm-cifar10", "--dataset_name", str(local), "--num_epochs", "1", "--output_dir", str(out),
            "--model_config", "test-tiny", "--resolution", "8", "--ddpm_num_steps", "50", "--train_batch_size", "4",
            "--lr_warmup_steps", "0", "--eval_size", "4", "--eval_num_images", "4", "--eval_num_timesteps", "2",
            "--eval_batch_size", "2", "--ddpm_num_inference_steps", "4", "--save_images_steps", "100"]  # fmt: skip
    summary = train(parse_args(argv))
    assert summary["optimizer_steps"] == 5  # one epoch: 20 training images at batch 4
    saved = json.loads((out / "training_args.json").read_text())
    assert (saved["num_epochs"], saved["max_train_steps"]) == (1, None)


def test_the_readme_has_one_command_per_recipe_and_each_parses():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Reproducing the papers")[1].split("\n### ")[0]
    commands = [line for line in section.splitlines() if line.startswith("accelerate launch training/train.py")]
    argvs = [shlex.split(line)[3:] for line in commands]
    assert sorted(argv[argv.index("--config") + 1] for argv in argvs) == sorted(PAPERS)
    for argv in argvs:
        name = argv[argv.index("--config") + 1]
        config = parse_args(argv)
        assert {key: getattr(config, key) for key in PAPERS[name]} == PAPERS[name]
