"""Train tiny → publish → load where hf_ddpm is not installed: a real training run (hf_ddpm.training, the code behind
training/train.py) published through the --push_to_hub hook to the local Hub (tests/hub_server.py). Slow: a few
training steps plus three process start-ups."""

import json
import sys

import numpy as np
import pytest
from hub_clients import REPO, finish, make_bare_venv, start_script, tree_hashes
from hub_server import HubServer

from hf_ddpm.remote_code import remote_files

TOKEN = "hf_TrainedRunToken55555555"
REPO_ID = "test-user/trained-ddpm"
TRAIN_ARGS = [
    "--model_config", "test-tiny", "--resolution", "8", "--ddpm_num_steps", "50", "--train_batch_size", "4",
    "--max_train_steps", "4", "--lr_warmup_steps", "0", "--checkpointing_steps", "2", "--eval_size", "16",
    "--eval_num_images", "4", "--eval_num_timesteps", "2", "--eval_batch_size", "4",
    "--ddpm_num_inference_steps", "10",
]  # fmt: skip
PUSH_ARGS = ["--push_to_hub", "--hub_model_id", REPO_ID, "--hub_token", TOKEN]

TRAIN_AND_PUBLISH = """
    import json, sys, numpy as np, torch
    import hf_ddpm.training.loop as loop
    import hf_ddpm.hub as hook
    from hf_ddpm import HFDDPMPipeline
    from hf_ddpm.training import parse_args, train

    argv, push = sys.argv[1:-5], sys.argv[-5:]  # push: --push_to_hub --hub_model_id ID --hub_token T
    wired = loop.publish is hook.publish  # training's --push_to_hub calls hf_ddpm.hub.publish
    if wired:
        train(parse_args(argv + push))
    else:  # what the hook does, after a run without --push_to_hub
        args = parse_args(argv)
        train(args)
        args.push_to_hub, args.hub_model_id, args.hub_token = True, push[2], push[4]
        hook.check_publish(args)
        hook.publish(args.output_dir, args)
    pipe = HFDDPMPipeline.from_pretrained(argv[argv.index("--output_dir") + 1])
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.manual_seed(5), num_inference_steps=10, output_type="np").images
    np.save("local.npy", images)
    print(json.dumps({"wired": wired}))
"""

LOAD_WITHOUT_HF_DDPM = f"""
    import importlib.util, numpy as np, torch
    from diffusers import DiffusionPipeline
    assert importlib.util.find_spec("hf_ddpm") is None
    pipe = DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.manual_seed(5), num_inference_steps=10, output_type="np").images
    np.save("remote.npy", images)
"""


@pytest.mark.slow
def test_a_trained_run_published_by_the_training_hook_loads_without_hf_ddpm(tmp_path):
    server = HubServer(tmp_path)
    try:
        out = tmp_path / "out"
        env = server.env(tmp_path, None) | {"PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
        argv = ["--output_dir", str(out), *TRAIN_ARGS, *PUSH_ARGS]
        trained = json.loads(finish(start_script(sys.executable, TRAIN_AND_PUBLISH, env, tmp_path, *argv), 600))
        before = tree_hashes(out)
        assert any(name.startswith("checkpoint-") for name in before) and "training_args.json" in before

        files = server.files(REPO_ID)
        assert set(files) == {
            ".gitattributes", "README.md", "model_index.json", *remote_files().values(), "samples.png",
            "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        }  # fmt: skip
        assert files["samples.png"] == (out / "samples.png").read_bytes()
        assert not any(TOKEN.encode() in content for content in files.values())
        summary = json.loads((out / "training_summary.json").read_text())
        assert f"{summary['eval']['bits_per_dim']:.4f} ± " in files["README.md"].decode()
        assert all(r["authorization"] == f"Bearer {TOKEN}" for r in server.requests() if "/api/" in r["path"])

        bare = make_bare_venv(tmp_path / "bare")
        finish(start_script(bare, LOAD_WITHOUT_HF_DDPM, server.env(tmp_path, None), tmp_path))
        np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy"), atol=1e-6)
        assert tree_hashes(out) == before
        print("training hook wired to hf_ddpm.hub.publish:", trained["wired"])
    finally:
        server.stop()
