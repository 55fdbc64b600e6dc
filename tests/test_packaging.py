"""What a wheel of hf_ddpm holds: installed from it (not from this checkout), the package renders model cards
from its own copy of model_cards/, prepares the Space from its own copy of examples/gradio_space/, writes the
remote-code modules from its own source, and trains with `accelerate launch -m hf_ddpm.train`."""

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from diffusers import UNet2DModel
from hub_clients import make_bare_venv

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config

ROOT = Path(__file__).resolve().parents[1]

# Run in the wheel's install: the editable install's import hook (a meta path finder) is dropped so that only the
# directory on PYTHONPATH provides hf_ddpm.
IN_THE_WHEEL = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import hf_ddpm
from hf_ddpm.hub import save_hub_pipeline
from hf_ddpm.model_card import TEMPLATE_PATH, render_model_card
from hf_ddpm.space import DEFAULT_APP_DIR, prepare_space
pipeline_dir, out, space = sys.argv[1:4]
card = render_model_card(pipeline_dir, "me/from-a-wheel")
pipe = hf_ddpm.HFDDPMPipeline.from_pretrained(pipeline_dir)
save_hub_pipeline(pipe, out)
prepare_space(DEFAULT_APP_DIR, "me/from-a-wheel", space)
print(json.dumps({"package": hf_ddpm.__file__, "template": str(TEMPLATE_PATH), "card": card.text,
                  "app_dir": str(DEFAULT_APP_DIR)}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(  # torch requires setuptools >= 77, which is what pyproject.toml's build needs
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (path,) = out.glob("hf_ddpm-*.whl")
    return path


def test_the_wheel_ships_the_card_template_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"hf_ddpm/model_cards/model_card.md": ROOT / "model_cards" / "model_card.md"}
    for name in ("README.md", "app.py", "requirements.txt"):
        shipped[f"hf_ddpm/gradio_space/{name}"] = ROOT / "examples" / "gradio_space" / name
    for recipe in (ROOT / "training" / "recipes").glob("*.yaml"):  # `--config ddpm-cifar10` from a wheel
        shipped[f"hf_ddpm/recipes/{recipe.name}"] = recipe
    for name, source in shipped.items():
        assert zipfile.ZipFile(wheel).read(name) == source.read_bytes(), name
    assert all(n.startswith(("hf_ddpm/", "hf_ddpm-")) for n in names)  # nothing outside the package
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hf_ddpm").rglob("*.py")}
    assert sources <= set(names)  # every module, the training package's included


def test_installed_from_the_wheel_it_renders_cards_and_saves_loadable_pipelines(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    pipeline_dir, saved, space = tmp_path / "pipeline", tmp_path / "saved", tmp_path / "space"
    HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10)).save_pretrained(
        pipeline_dir
    )
    run = subprocess.run(
        [sys.executable, "-c", IN_THE_WHEEL, str(pipeline_dir), str(saved), str(space)],
        cwd=tmp_path,  # not the checkout: its hf_ddpm/ must not be importable from the working directory
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(site)
    assert Path(result["template"]) == site / "hf_ddpm" / "model_cards" / "model_card.md"
    assert "me/from-a-wheel" in result["card"] and "No training configuration was recorded" in result["card"]
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"][0].startswith("pipeline_hf_ddpm_")  # the remote-code module, written from the wheel
    assert (saved / f"{index['_class_name'][0]}.py").is_file()
    assert Path(result["app_dir"]) == site / "hf_ddpm" / "gradio_space"
    assert (space / "app.py").read_bytes() == (ROOT / "examples" / "gradio_space" / "app.py").read_bytes()
    assert "me/from-a-wheel" in (space / "README.md").read_text()  # the model it loads, in its front matter


def test_the_lazy_public_names_are_the_listed_ones_and_all_resolve():
    import hf_ddpm

    assert sorted(hf_ddpm.__all__) == sorted(hf_ddpm._EXPORTS)
    for name in hf_ddpm.__all__:
        assert getattr(hf_ddpm, name) is getattr(importlib.import_module(hf_ddpm._EXPORTS[name], "hf_ddpm"), name)
    with pytest.raises(AttributeError, match="has no attribute 'HFDDPM'"):
        hf_ddpm.HFDDPM  # noqa: B018


def test_installed_into_a_fresh_virtualenv_it_trains_with_accelerate_launch_m(wheel, tmp_path):
    """pip install of the wheel into a virtual environment outside the checkout (which sees torch, diffusers and
    accelerate but not this checkout's hf_ddpm), then a 2-step `accelerate launch -m hf_ddpm.train` run whose
    pipeline loads and samples."""
    python = make_bare_venv(tmp_path)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    where = subprocess.run(
        [python, "-c", "import hf_ddpm.train, sys; print(hf_ddpm.train.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv") and not Path(where.stdout).is_relative_to(ROOT)
    launcher = [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    flags = [
        "--output_dir", str(tmp_path / "out"), "--model_config", "test-tiny", "--resolution", "8",
        "--ddpm_num_steps", "50", "--train_batch_size", "4", "--max_train_steps", "2", "--lr_warmup_steps", "0",
        "--eval_size", "16", "--eval_num_images", "4", "--eval_num_timesteps", "2", "--eval_batch_size", "2",
        "--ddpm_num_inference_steps", "4",
    ]  # fmt: skip
    run = subprocess.run(
        [*launcher, "-m", "hf_ddpm.train", *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pipe = HFDDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == 50
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.std() > 0
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert (tmp_path / "out" / f"{index['_class_name'][0]}.py").is_file()  # the remote-code module, from the wheel


def test_the_space_requirements_list_what_diffusers_needs_to_load_without_warnings():
    lines = (ROOT / "examples" / "gradio_space" / "requirements.txt").read_text().splitlines()
    names = {line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0] for line in lines}
    assert {"torch", "diffusers", "accelerate", "safetensors", "huggingface_hub"} <= names
