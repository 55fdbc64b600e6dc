"""The diffusers way to save and share: `HFDDPMPipeline.save_pretrained` writes a folder and `push_to_hub` a repo
(local Hub, tests/hub_server.py) that load all three ways, the package-free way checked in a virtual environment
without hf_ddpm; the push carries hf_ddpm's model card."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hub_clients import REPO, finish, make_bare_venv, start_script

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.remote_code import remote_files

TOKEN = "hf_TestTokenSavePush0123456789"
REPO_ID = "test-user/saved-ddpm"
PLAIN_REPO_ID = "test-user/saved-by-diffusers"
SAVED_AND_PUSHED_ID = "test-user/saved-and-pushed"  # save_pretrained(..., push_to_hub=True)
T, SEED, BATCH = 20, 11, 2


def make_pipe(learned: bool = False) -> HFDDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", learned_variance=learned)).eval()
    variance = "learned_range" if learned else "fixed_large"
    pipe = HFDDPMPipeline(unet, HFDDPMScheduler(num_train_timesteps=T, variance_type=variance))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loading process runs (OMP_NUM_THREADS=1)
    try:
        return pipe(batch_size=BATCH, generator=torch.manual_seed(SEED), num_inference_steps=T, output_type="np").images
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared(hub, tmp_path_factory):
    """One pipeline saved with save_pretrained and pushed with push_to_hub (in a process pointed at the test Hub);
    both loaded in one process of a virtual environment without hf_ddpm."""
    tmp = tmp_path_factory.mktemp("save_push")
    pipe = make_pipe(learned=True)
    pipe.save_pretrained(tmp / "saved")
    push = f"""
        import torch
        from diffusers import DiffusionPipeline, UNet2DModel
        from hf_ddpm import HFDDPMPipeline
        from hf_ddpm.remote_code import add_remote_code
        pipe = HFDDPMPipeline.from_pretrained({str(tmp / "saved")!r})  # an absolute path, which diffusers records
        pipe.save_pretrained({str(tmp / "saved_again")!r})
        DiffusionPipeline.save_pretrained(pipe, {str(tmp / "plain")!r})  # as diffusers alone would save it
        add_remote_code({str(tmp / "plain")!r})
        pipe.save_pretrained({str(tmp / "saved_and_pushed")!r}, push_to_hub=True, repo_id={SAVED_AND_PUSHED_ID!r})
        print(pipe.push_to_hub({REPO_ID!r}))
    """
    env = hub.env(tmp, TOKEN)
    url = finish(start_script(sys.executable, push, env | {"PYTHONPATH": str(REPO)}, tmp)).strip()
    cli_push = [sys.executable, "-m", "hf_ddpm", "push", str(tmp / "plain"), "--repo_id", PLAIN_REPO_ID]
    pushed = subprocess.run(cli_push, env=env | {"PYTHONPATH": str(REPO)}, cwd=tmp, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    load = f"""
        import importlib.util, json, sys, numpy as np, torch
        from diffusers import DiffusionPipeline
        assert importlib.util.find_spec("hf_ddpm") is None, sys.path
        out = {{}}
        for name, source in (("saved", {str(tmp / "saved")!r}), ("pushed", {REPO_ID!r}),
                             ("saved_and_pushed", {SAVED_AND_PUSHED_ID!r})):
            pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            x = pipe(batch_size={BATCH}, generator=torch.manual_seed({SEED}), num_inference_steps={T}, output_type="np")
            np.save(name + ".npy", x.images)
            out[name] = type(pipe).__name__
        pipe.save_pretrained("resaved")  # the remote code saves itself the same way
        print(json.dumps(out))
    """
    bare = make_bare_venv(tmp / "venv")
    classes = json.loads(finish(start_script(bare, load, hub.env(tmp, None), tmp)).strip().splitlines()[-1])
    loaded = {name: np.load(tmp / f"{name}.npy") for name in ("saved", "pushed", "saved_and_pushed")}
    return {"tmp": tmp, "pipe": pipe, "url": url, "classes": classes, "loaded": loaded}


def test_save_pretrained_writes_the_remote_code_modules(shared):
    saved = shared["tmp"] / "saved"
    index = json.loads((saved / "model_index.json").read_text())
    modules = remote_files()
    assert index["_class_name"] == [modules["pipeline"].removesuffix(".py"), "HFDDPMPipeline"]
    assert index["scheduler"] == [
        modules["scheduler"].removeprefix("scheduler/").removesuffix(".py"),
        "HFDDPMScheduler",
    ]
    assert (saved / modules["pipeline"]).is_file() and (saved / modules["scheduler"]).is_file()
    assert not list(saved.rglob("*.bin"))


def test_saved_folder_loads_without_hf_ddpm_with_the_same_images(shared):
    assert shared["classes"]["saved"] == "HFDDPMPipeline"
    np.testing.assert_allclose(shared["loaded"]["saved"], images(shared["pipe"]), atol=1e-5)


def test_save_pretrained_with_push_to_hub_pushes_the_saved_folder(shared, hub):
    """diffusers' `save_pretrained(dir, push_to_hub=True, repo_id=...)`: the folder saved, then pushed as
    push_to_hub pushes it (the same files), loading without hf_ddpm to the same images."""
    pushed, saved_and_pushed = hub.files(REPO_ID), hub.files(SAVED_AND_PUSHED_ID)
    assert saved_and_pushed is not None and sorted(saved_and_pushed) == sorted(pushed)
    assert (shared["tmp"] / "saved_and_pushed" / "model_index.json").is_file()
    assert shared["classes"]["saved_and_pushed"] == "HFDDPMPipeline"
    np.testing.assert_allclose(shared["loaded"]["saved_and_pushed"], images(shared["pipe"]), atol=1e-5)


def test_saved_folder_loads_with_hf_ddpm_and_as_plain_components(shared):
    saved = shared["tmp"] / "saved"
    again = HFDDPMPipeline.from_pretrained(saved)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(again), images(shared["pipe"]))
    assert UNet2DModel.from_pretrained(saved, subfolder="unet").config.out_channels == 6
    assert DDPMScheduler.from_pretrained(saved, subfolder="scheduler").config.variance_type == "learned_range"


def test_remote_code_resaves_a_folder_that_names_its_own_modules(shared):
    resaved = shared["tmp"] / "resaved"
    index = json.loads((resaved / "model_index.json").read_text())
    modules = remote_files()
    assert index["_class_name"][0] == modules["pipeline"].removesuffix(".py")
    assert (resaved / modules["pipeline"]).read_bytes() == (shared["tmp"] / "saved" / modules["pipeline"]).read_bytes()
    assert (resaved / modules["scheduler"]).is_file()
    again = HFDDPMPipeline.from_pretrained(resaved)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(again), images(shared["pipe"]))


def files_naming(path: str, files: dict[str, bytes]) -> list[str]:
    return sorted(name for name, data in files.items() if path.encode() in data)


def folder_files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_nothing_saved_or_pushed_names_a_local_path(shared, hub):
    """After from_pretrained(<absolute path>), diffusers records that path (`_name_or_path`) and its own
    save_pretrained writes it into model_index.json and unet/config.json; hf_ddpm's save_pretrained (in the package
    and as remote code), push_to_hub and `python -m hf_ddpm push` write it nowhere."""
    tmp = str(shared["tmp"])
    plain = folder_files(shared["tmp"] / "plain")
    assert files_naming(tmp, plain) == ["model_index.json", "unet/config.json"]  # what a save would leak
    assert files_naming(tmp, folder_files(shared["tmp"] / "saved_again")) == []
    assert files_naming(tmp, folder_files(shared["tmp"] / "resaved")) == []  # the remote code's own save
    assert files_naming(tmp, hub.files(REPO_ID)) == []
    assert files_naming(tmp, hub.files(PLAIN_REPO_ID)) == []
    assert set(plain) <= set(hub.files(PLAIN_REPO_ID))  # the push carried every file, without the path


def test_push_to_hub_uploads_a_repo_that_loads_without_hf_ddpm_with_the_card(shared, hub):
    assert "/commit/" in shared["url"]
    assert shared["classes"]["pushed"] == "HFDDPMPipeline"
    np.testing.assert_allclose(shared["loaded"]["pushed"], images(shared["pipe"]), atol=1e-5)
    files = hub.files(REPO_ID)
    modules = remote_files()
    assert {"README.md", "model_index.json", modules["pipeline"], modules["scheduler"]} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card
    assert TOKEN not in card


def test_push_to_hub_refuses_what_it_cannot_honour_before_any_work(monkeypatch):
    """Refused before the token check and the save (without a token, either would answer otherwise)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="create_pr=True is not supported"):
        make_pipe().push_to_hub("test-user/x", create_pr=True)
    with pytest.raises(ValueError, match="safe_serialization=False is not supported .* only safetensors weights are"):
        make_pipe().push_to_hub("test-user/x", safe_serialization=False)
    with pytest.raises(TypeError, match=r"push_to_hub got unexpected keyword arguments \['foo'\]; it takes repo_id"):
        make_pipe().push_to_hub("test-user/x", foo=1)


def test_a_scheduler_saved_or_pushed_alone_is_a_plain_ddpm_scheduler_config(hub, tmp_path):
    """diffusers loads a scheduler from its config alone (no trust_remote_code path), so a scheduler saved or pushed
    by itself carries no code and loads as diffusers' DDPMScheduler with the same process (HFDDPMScheduler's
    docstring); inside a pipeline its folder holds the remote code (test_save_pretrained_writes_...)."""
    kwargs = {"num_train_timesteps": T, "beta_schedule": "cosine", "variance_type": "learned_range",
              "prediction_type": "v_prediction", "timestep_spacing": "trailing"}  # fmt: skip
    ours = HFDDPMScheduler(**kwargs)
    ours.save_pretrained(tmp_path / "alone")
    assert [p.name for p in (tmp_path / "alone").iterdir()] == ["scheduler_config.json"]
    config = json.loads((tmp_path / "alone" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "HFDDPMScheduler"
    ddpm_keys = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    assert set(config) - {"_class_name", "_diffusers_version"} == ddpm_keys  # nothing diffusers would warn about
    theirs = DDPMScheduler.from_pretrained(tmp_path / "alone")
    assert {k: theirs.config[k] for k in kwargs} == {**kwargs, "beta_schedule": "squaredcos_cap_v2"}
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ours.alphas_cumprod, rtol=0, atol=1e-7)
    again = HFDDPMScheduler.from_pretrained(tmp_path / "alone")
    assert {k: again.config[k] for k in ddpm_keys} == {k: ours.config[k] for k in ddpm_keys}

    push = f"""
        import json
        from diffusers import DDPMScheduler
        from hf_ddpm import HFDDPMScheduler
        HFDDPMScheduler(**{kwargs!r}).push_to_hub("test-user/scheduler-alone")
        print(json.dumps(dict(DDPMScheduler.from_pretrained("test-user/scheduler-alone").config)))
    """
    env = hub.env(tmp_path, TOKEN) | {"PYTHONPATH": str(REPO)}
    loaded = json.loads(finish(start_script(sys.executable, push, env, tmp_path)).strip().splitlines()[-1])
    assert {k: loaded[k] for k in ddpm_keys} == {k: theirs.config[k] for k in ddpm_keys}
    assert not [name for name in hub.files("test-user/scheduler-alone") if name.endswith(".py")]
