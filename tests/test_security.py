"""Untrusted files and secrets: weights load from safetensors only unless the caller opts in, and even then a pickle
cannot run code; a repo's bundled code runs only with trust_remote_code=True; the Hub token never reaches a file, a
log or the Hub (a canary token is searched for everywhere a training run with --push_to_hub writes)."""

import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from hub_clients import REPO, finish, start_script
from hub_server import HubServer
from training_runs import launch_command, tiny

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.hub import save_hub_pipeline
from hf_ddpm.remote_code import PIPELINE_PREFIX, remote_files
from hf_ddpm.training import parse_args, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def tiny_pipeline() -> HFDDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", in_channels=1, out_channels=1, sample_size=8))
    return HFDDPMPipeline(unet, HFDDPMScheduler(num_train_timesteps=50))


class Payload:
    """Unpickling this creates a file: what a malicious .bin could do instead (harmless here)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_weights_are_refused_unless_the_caller_opts_in(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    match = r"pickled/unet holds only pickled weights \['diffusion_pytorch_model.bin'\] and no .*use_safetensors=False"
    with pytest.raises(OSError, match=match):
        HFDDPMPipeline.from_pretrained(tmp_path / "pickled")
    with pytest.warns(UserWarning, match="use_safetensors=False: loading pickled .bin UNet weights .* Unpickling can"):
        loaded = HFDDPMPipeline.from_pretrained(tmp_path / "pickled", use_safetensors=False)
    for a, b in zip(pipe.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    out = tmp_path / "out"  # fine-tuning reads the same way, before anything is written
    with pytest.raises(OSError, match=match):
        train(parse_args(tiny(out, model=("--pretrained_model_name_or_path", str(tmp_path / "pickled")))))
    assert not out.exists()


def test_a_malicious_pickle_runs_nothing_even_with_the_opt_in(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": Payload(marker)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="only pickled weights"):
        HFDDPMPipeline.from_pretrained(tmp_path)  # refused without opening the file
    with pytest.warns(UserWarning, match="Unpickling can run code"), pytest.raises(OSError, match="Unable to load"):
        HFDDPMPipeline.from_pretrained(tmp_path, use_safetensors=False)  # diffusers: torch.load(weights_only=True)
    assert not marker.exists()


def test_a_repos_code_runs_only_with_trust_remote_code(tmp_path):
    """The bundled pipeline module is swapped for one that records being imported: diffusers imports it only with
    trust_remote_code=True; HFDDPMPipeline.from_pretrained never imports a repo's modules."""
    save_hub_pipeline(tiny_pipeline(), tmp_path)
    marker, module = tmp_path / "imported", f"{PIPELINE_PREFIX}_canary{uuid.uuid4().hex[:8]}"
    source = (tmp_path / remote_files()["pipeline"]).read_text()
    (tmp_path / f"{module}.py").write_text(source + f"\nopen({str(marker)!r}, 'w').close()\n")
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index | {"_class_name": [module, "HFDDPMPipeline"]}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    assert type(HFDDPMPipeline.from_pretrained(tmp_path)) is HFDDPMPipeline
    assert not marker.exists()
    DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert marker.exists()  # the switch is the only thing between a repo's code and this process


HUB_LOADS = """
    import json, sys, warnings
    from huggingface_hub import create_repo, upload_folder
    from hf_ddpm import HFDDPMPipeline

    pickled, no_index = sys.argv[1:3]
    results = {}
    for name, folder, ignore in [("pickled", pickled, None), ("no-index", no_index, ["model_index.json"])]:
        repo = create_repo(f"test-user/{name}", exist_ok=True).repo_id
        upload_folder(repo_id=repo, folder_path=folder, ignore_patterns=ignore)
        try:
            HFDDPMPipeline.from_pretrained(repo)
            results[name] = "loaded"
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HFDDPMPipeline.from_pretrained("test-user/pickled", use_safetensors=False)
    results["opt-in warning"] = [str(w.message) for w in caught if "use_safetensors=False" in str(w.message)]
    print(json.dumps(results))
"""


def training_with_a_canary_token(server: HubServer, tmp_path: Path, token: str) -> subprocess.Popen:
    out = tmp_path / "out"
    argv = tiny(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_steps", "2",
                "--eval_bits_per_dim_steps", "2", "--push_to_hub", "--hub_model_id", "test-user/canary",
                "--hub_token", token)  # fmt: skip
    env = server.env(tmp_path, None) | {"PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    return subprocess.Popen(launch_command(argv), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_hub_token_is_never_written_logged_or_pushed_and_hub_repos_load_safely(tmp_path):
    token = f"hf_Canary{uuid.uuid4().hex}"
    forms = {"token": token.encode(), "base64": base64.b64encode(token.encode()), "hex": token.encode().hex().encode()}
    forms["base64url"] = base64.urlsafe_b64encode(token.encode())
    server = HubServer(tmp_path)
    try:
        (tmp_path / "loads").mkdir()
        tiny_pipeline().save_pretrained(tmp_path / "pickled", safe_serialization=False)
        save_hub_pipeline(tiny_pipeline(), tmp_path / "no-index")
        loads = start_script(sys.executable, HUB_LOADS, server.env(tmp_path / "loads", "hf_OtherToken") | {
            "PYTHONPATH": str(REPO)}, tmp_path / "loads", str(tmp_path / "pickled"), str(tmp_path / "no-index"))  # fmt: skip
        training = training_with_a_canary_token(server, tmp_path, token)
        stdout, stderr = training.communicate(timeout=600)
        assert training.returncode == 0, stderr.decode()[-4000:]
        results = json.loads(finish(loads).strip().splitlines()[-1])

        written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "loads" not in p.parts}
        pushed = server.files("test-user/canary")
        names = {p.name for p in written}  # all that the run wrote, accelerate's pickles and TensorBoard's events too
        assert {"training_args.json", "training_summary.json", "optimizer.bin", "random_states_0.pkl",
                "custom_checkpoint_0.pkl", "samples.png", "step-0000002.png"} <= names  # fmt: skip
        assert any(name.startswith("events.out.tfevents") for name in names)
        assert set(pushed) >= {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors"}
        places = {**{str(p): data for p, data in written.items()}, "stdout": stdout, "stderr": stderr}
        places |= {f"pushed:{name}": data for name, data in pushed.items()}
        leaks = [(place, form) for place, data in places.items() for form, needle in forms.items() if needle in data]
        assert leaks == [], leaks
        assert any(r["authorization"] == f"Bearer {token}" for r in server.requests())
    finally:
        server.stop()
    assert results["no-index"].startswith("OSError: test-user/no-index does not appear to have a file named model_")
    assert "does not appear to have a file named diffusion_pytorch_model.safetensors" in results["pickled"]
    assert results["opt-in warning"] and "Unpickling can run code" in results["opt-in warning"][0]
