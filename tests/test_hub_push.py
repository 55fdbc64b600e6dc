"""Push → load against a local Hub (tests/hub_server.py) over real HTTP, with the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, and pytest has imported it already, so every client runs in
a subprocess pointed at the server: the push (`python -m hf_ddpm push`), and the loads, one of them in a virtual
environment that has diffusers but no hf_ddpm. The tiny pipeline (test-tiny UNet, T = 20) samples in a blink; the
cost of these tests is the start-up of each process (importing torch and diffusers).
"""

import hashlib
import http.client
import json
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_clients import REPO, finish, make_bare_venv, start_script, tree_hashes
from hub_server import HubServer
from push_runs import (
    BATCH,
    MODULES,
    PUSHED,
    REPO_ID,
    SEED,
    TOKEN,
    T,
    assert_failed_cleanly,
    make_output_dir,
    start_cli,
    start_pushes,
    wait,
)


def local_images(pipe) -> np.ndarray:
    """The images the pipeline samples here, with one thread as the loading processes use (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipe(batch_size=BATCH, generator=torch.manual_seed(SEED), num_inference_steps=T, output_type="np").images
    finally:
        torch.set_num_threads(threads)


def hf_ddpm_cli(server: HubServer, tmp: Path, argv: list[str], token=TOKEN, **env_extra):
    """`python -m hf_ddpm ARGV` in a process pointed at the test Hub, with HF_TOKEN=token."""
    env = server.env(tmp, token) | {"PYTHONPATH": str(REPO)} | env_extra
    command = [sys.executable, "-m", "hf_ddpm", *argv]
    return subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


def push(server: HubServer, tmp: Path, output_dir: Path, repo_id: str, *extra, **kwargs):
    return hf_ddpm_cli(server, tmp, ["push", str(output_dir), "--repo-id", repo_id, *extra], **kwargs)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    return make_bare_venv(tmp_path_factory.mktemp("bare_venv"))


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """The tiny pipeline pushed once with the CLI (token from HF_TOKEN); the output dir hashed before and after."""
    tmp = tmp_path_factory.mktemp("push")
    pipe = make_output_dir(tmp / "out")
    before = tree_hashes(tmp / "out")
    hub.clear()
    result = push(hub, tmp, tmp / "out", REPO_ID)
    assert result.returncode == 0, result.stderr
    reference = local_images(pipe)
    return {"tmp": tmp, "result": result, "before": before, "requests": hub.requests(), "reference": reference}


@pytest.fixture(scope="module")
def loaded(hub, pushed, bare_python):
    """Load the pushed repo three ways in two processes at once; each saves what it sampled and read."""
    tmp = pushed["tmp"]
    load_a = f"""
        import importlib.util, json, sys, numpy as np, torch
        from diffusers import DiffusionPipeline
        assert importlib.util.find_spec("hf_ddpm") is None, sys.path  # diffusers alone: no hf_ddpm here
        try:
            DiffusionPipeline.from_pretrained("{REPO_ID}")
            raise SystemExit("loaded remote code without trust_remote_code=True")
        except ValueError as err:
            assert "trust_remote_code" in str(err), err
        pipe = DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size={BATCH}, generator=torch.manual_seed({SEED}), num_inference_steps={T}, output_type="np").images
        np.save("way_a.npy", images)
        print(json.dumps({{"pipeline_module": type(pipe).__module__, "scheduler_module": type(pipe.scheduler).__module__}}))
    """
    load_bc = f"""
        import json, re, numpy as np, torch
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
        from huggingface_hub import ModelCard, create_repo, hf_hub_download, list_repo_tree, model_info, upload_folder
        from huggingface_hub.errors import RevisionNotFoundError
        from hf_ddpm import HFDDPMPipeline
        pipe = HFDDPMPipeline.from_pretrained("{REPO_ID}")  # no trust_remote_code: runs no code from the repo
        # the Hub arguments reach both components: a revision, the cache alone
        assert HFDDPMPipeline.from_pretrained("{REPO_ID}", revision=model_info("{REPO_ID}").sha).unet.dtype == torch.float32
        assert HFDDPMPipeline.from_pretrained("{REPO_ID}", local_files_only=True, dtype=torch.float64).unet.dtype == torch.float64
        try:
            HFDDPMPipeline.from_pretrained("{REPO_ID}", revision="0" * 40)
            raise SystemExit("loaded a revision that does not exist")
        except (RevisionNotFoundError, OSError):
            pass
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size={BATCH}, generator=torch.manual_seed({SEED}), num_inference_steps={T}, output_type="np").images
        np.save("way_b.npy", images)
        unet = UNet2DModel.from_pretrained("{REPO_ID}", subfolder="unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained("{REPO_ID}", subfolder="scheduler")
        theirs = DDPMPipeline(unet=unet, scheduler=scheduler)
        theirs.set_progress_bar_config(disable=True)
        images = theirs(batch_size={BATCH}, generator=torch.manual_seed({SEED}), num_inference_steps={T}, output_type="np").images
        np.save("way_c.npy", images)
        card = ModelCard.load("{REPO_ID}")
        ran = []  # the card's snippets as a reader copies them
        for snippet in re.findall(r"```python\\n(.*?)```", card.text, re.S):
            scope = {{}}
            exec(snippet, scope)
            bpd = scope.get("bits_per_dim")
            ran.append({{"pipeline": type(scope["pipe"]).__name__, "images": len(scope.get("images", [])),
                        "bits_per_dim": None if bpd is None else [float(v) for v in bpd]}})
        tree = sorted(f.path for f in list_repo_tree("{REPO_ID}", recursive=True) if hasattr(f, "size"))
        # the Space API, for the Gradio demo's push: create, upload, read back
        space = create_repo("test-user/demo", repo_type="space", space_sdk="gradio", token="{TOKEN}").repo_id
        open("app.py", "w").write("print('hello')\\n")
        upload_folder(repo_id=space, repo_type="space", folder_path=".", allow_patterns=["app.py"], token="{TOKEN}")
        app = open(hf_hub_download(space, "app.py", repo_type="space")).read()
        print(json.dumps({{"card": card.data.to_dict(), "text": card.text, "tree": tree, "space_app": app, "ran": ran,
                          "ddpm_scheduler": type(scheduler).__name__}}))
    """
    env = hub.env(tmp / "load", None)  # reading a public repo needs no token
    (tmp / "load").mkdir()
    a = start_script(bare_python, load_a, env, tmp / "load")
    bc = start_script(sys.executable, load_bc, env | {"PYTHONPATH": str(REPO)}, tmp / "load")
    out_a, out_bc = finish(a), finish(bc)
    info = json.loads(out_a.strip().splitlines()[-1]) | json.loads(out_bc.strip().splitlines()[-1])
    info |= {f"way_{w}": np.load(tmp / "load" / f"way_{w}.npy") for w in "abc"}
    return info


def test_push_uploads_only_the_pipeline_card_and_sample_grid(pushed, hub):
    files = hub.files(REPO_ID)
    assert set(files) == PUSHED
    assert not any(TOKEN.encode() in content for content in files.values())
    assert TOKEN not in pushed["result"].stdout + pushed["result"].stderr
    assert f"pushed {pushed['tmp'] / 'out'} to {REPO_ID}" in pushed["result"].stdout
    api_calls = [r for r in pushed["requests"] if r["path"].startswith("/api/")]
    assert {r["path"] for r in api_calls} >= {"/api/repos/create", f"/api/models/{REPO_ID}/commit/main"}
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in api_calls)
    assert not any("xet" in r["path"].lower() or "lfs" in r["path"].lower() for r in pushed["requests"])
    assert tree_hashes(pushed["tmp"] / "out") == pushed["before"]  # the output directory is read, never written
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == [MODULES["pipeline"][:-3], "HFDDPMPipeline"]
    assert index["scheduler"] == [MODULES["scheduler"][10:-3], "HFDDPMScheduler"] and index["unet"][0] == "diffusers"
    assert hub.repo(REPO_ID)["private"] is False


def test_evaluate_of_a_hub_repo_names_the_pushed_weights_and_their_folder_takes_its_metrics(
    hub, tiny_pipeline, tmp_path
):
    """`evaluate USER/NAME --metrics_out` names the UNet weights file of the cache snapshot it loaded: the file that
    was pushed, so the pushed folder exports with those metrics (push and export check them)."""
    from hf_ddpm.hub import export_hub_folder

    folder = tiny_pipeline(10)
    pushed_once = push(hub, tmp_path, folder, "test-user/measured")
    assert pushed_once.returncode == 0, pushed_once.stderr[-3000:]
    argv = ["evaluate", "test-user/measured", "--num_images", "2", "--num_timesteps", "2", "--metrics_out", "m.json"]
    evaluated = hf_ddpm_cli(hub, tmp_path, argv, token=None)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    weights = hub.files("test-user/measured")["unet/diffusion_pytorch_model.safetensors"]
    assert weights == (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    entry = json.loads((tmp_path / "m.json").read_text())["bits_per_dim"]
    assert entry["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    export_hub_folder(folder, tmp_path / "dest", repo_id="test-user/measured", metrics=tmp_path / "m.json")
    assert f"| {entry['value']:.4f} ± {entry['stderr']:.4f} |" in (tmp_path / "dest" / "README.md").read_text()


def test_pushing_again_leaves_nothing_of_the_earlier_push_that_loaders_would_read(hub, tmp_path):
    """A repo first pushed with sharded weights (another pipeline), then pushed with one file: the shards and their
    index go in the same commit, so every loader reads the weights pushed last; the Hub's own files stay."""
    pipe = make_output_dir(tmp_path / "out")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1.0)
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded" / "unet").glob("*-of-*.safetensors"))) > 1
    for folder in ("sharded", "out"):
        result = push(hub, tmp_path, tmp_path / folder, "test-user/pushed-twice")
        assert result.returncode == 0, result.stderr
    assert set(hub.files("test-user/pushed-twice")) == PUSHED
    with open(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors", "rb") as f:
        assert hub.files("test-user/pushed-twice")["unet/diffusion_pytorch_model.safetensors"] == f.read()


def test_a_failed_push_to_hub_call_names_the_call_to_make_again(hub, tmp_path):
    """HFDDPMPipeline.push_to_hub saves into a temporary folder, gone once it fails: the advice is the call, not a
    command naming that folder."""
    make_output_dir(tmp_path / "out")
    hub.fail(r"POST /api/repos/create", 500)
    script = f"""
        from hf_ddpm import HFDDPMPipeline
        try:
            HFDDPMPipeline.from_pretrained({str(tmp_path / "out")!r}).push_to_hub("test-user/lib-push")
        except Exception as err:
            print(type(err).__name__, err)
    """
    try:
        said = finish(
            start_script(sys.executable, script, hub.env(tmp_path, TOKEN) | {"PYTHONPATH": str(REPO)}, tmp_path)
        )
    finally:
        hub.clear()
    assert said.startswith("HubPushError pushing the pipeline to the Hub as test-user/lib-push failed: "), said
    assert "To push it again, run:\n    pipeline.push_to_hub('test-user/lib-push')" in said
    assert "hf_ddpm_save_" not in said and hub.files("test-user/lib-push") is None


def test_loads_with_diffusers_alone_without_hf_ddpm_installed(pushed, loaded):
    assert loaded["pipeline_module"] == f"diffusers_modules.local.{MODULES['pipeline'][:-3]}"
    assert loaded["scheduler_module"] == f"diffusers_modules.local.{MODULES['scheduler'][10:-3]}"
    reference = pushed["reference"]
    assert reference.std() > 0.05  # images, not a constant
    np.testing.assert_allclose(loaded["way_a"], reference, rtol=0, atol=1e-6)


def test_loads_with_hf_ddpm_without_remote_code(pushed, loaded):
    np.testing.assert_allclose(loaded["way_b"], pushed["reference"], rtol=0, atol=1e-6)


def test_loads_as_plain_diffusers_components(pushed, loaded):
    """UNet2DModel + DDPMScheduler in diffusers' DDPMPipeline: the same chain up to float32 rounding."""
    assert loaded["ddpm_scheduler"] == "DDPMScheduler"
    np.testing.assert_allclose(loaded["way_c"], pushed["reference"], rtol=0, atol=1e-4)


def test_card_parses_back_from_the_repo_with_its_metrics(loaded):
    card, text = loaded["card"], loaded["text"]
    assert card["library_name"] == "diffusers" and card["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "ddpm", "unconditional-image-generation", "hf_ddpm"} <= set(card["tags"])
    assert card["license"] == "apache-2.0"
    (result,) = card["model-index"][0]["results"]
    (metric,) = result["metrics"]
    assert metric["type"] == "bits_per_dim" and metric["value"] == 7.25
    assert metric["args"] == {"num_images": 4, "num_timesteps": 2, "stderr": 0.31}
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert f'HFDDPMPipeline.from_pretrained("{REPO_ID}")' in text
    assert f'DDPMScheduler.from_pretrained("{REPO_ID}", subfolder="scheduler")' in text
    assert "![Samples from this pipeline](samples.png)" in text and "@inproceedings{nichol2021improved" in text
    assert "7.2500 ± 0.3100" in text and "hub_token" not in text and "output_dir" not in text
    assert loaded["tree"] == sorted(PUSHED)


def test_the_cards_code_runs_as_a_reader_copies_it(loaded):
    """Each python block of the pushed card, run as it stands: the three ways load and way 2's bits/dim line
    evaluates the images it sampled."""
    ways = loaded["ran"]
    assert [w["pipeline"] for w in ways] == ["HFDDPMPipeline", "HFDDPMPipeline", "DDPMPipeline"]
    assert [w["images"] for w in ways] == [4, 4, 0]
    assert ways[0]["bits_per_dim"] is None and len(ways[1]["bits_per_dim"]) == 4
    assert all(0 < v < 100 for v in ways[1]["bits_per_dim"]), ways[1]


def test_server_serves_spaces_for_the_demo(loaded):
    assert loaded["space_app"] == "print('hello')\n"


@pytest.fixture(scope="module")
def failures(hub, tmp_path_factory):
    """Three pushes at once: the Hub answers 500 to creating the repo (create_repo is not retried, unlike preupload
    and hf_xet's commits, see hub_server.py); the Hub is down (nothing listens); offline mode (HF_ENDPOINT then
    points at a socket that records whether anyone connected). Once the 500 run has failed, the Hub recovers and the
    retry command it printed runs."""
    tmp = tmp_path_factory.mktemp("failures")
    closed, listening = socket.socket(), socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    hub.fail("^POST /api/repos/create$", 500, times=1, body='"name": ?"retry-ddpm"')  # then the Hub recovers
    runs = start_pushes(hub, tmp, {
        "500": ("test-user/retry-ddpm", ["--private"], {}),
        "down": ("test-user/down", [], {"HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}),
        "offline": ("test-user/offline", [], {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{listening.getsockname()[1]}"}),
    })  # fmt: skip
    wait(runs["500"])
    runs["500"]["files_after_failure"] = hub.files("test-user/retry-ddpm")
    printed = runs["500"]["stderr"].split("To push it again, run:\n")[1].splitlines()[0].strip()
    (tmp / "retry").mkdir()
    # without hf_xet's pipelined upload (the main push used it): upload_folder's single-commit path
    retry = start_cli(hub, tmp / "retry", shlex.split(printed)[3:], {"HF_HUB_DISABLE_XET": "1"})
    runs["retry"] = {"printed": printed, "process": retry}
    for run in runs.values():
        wait(run)
    listening.setblocking(False)
    try:
        listening.accept()
        runs["offline"]["connected"] = True
    except BlockingIOError:
        runs["offline"]["connected"] = False
    closed.close()
    listening.close()
    return runs


@pytest.mark.parametrize(("case", "reason"), [("500", "500 Internal Server Error"), ("down", "ConnectError")])
def test_failed_push_leaves_the_output_intact_and_says_how_to_push_again(failures, case, reason):
    assert_failed_cleanly(failures[case], reason, " --private" if case == "500" else "")


def test_the_printed_command_pushes_once_the_hub_recovers(hub, failures):
    run, retry = failures["500"], failures["retry"]
    assert run["files_after_failure"] is None  # the repo was never created
    assert retry["printed"] == f"python -m hf_ddpm push {run['out']} --repo_id test-user/retry-ddpm --private"
    assert retry["returncode"] == 0, retry["stderr"]
    assert set(hub.files(run["repo_id"])) == PUSHED and hub.repo(run["repo_id"])["private"]
    assert tree_hashes(run["out"]) == run["before"]


@pytest.mark.slow
def test_a_refused_commit_and_a_stalled_request_fail_cleanly(hub, tmp_path):
    """A 4xx on the commit (after the repo was created), and a create_repo that gets no answer within --timeout."""
    hub.fail("^POST /api/models/test-user/forbidden/commit/", 403)
    hub.fail("^POST /api/repos/create$", "hang", seconds=30, body='"name": ?"hangs"')
    runs = start_pushes(hub, tmp_path, {
        "403": ("test-user/forbidden", [], {}),
        "hangs": ("test-user/hangs", ["--timeout", "2"], {}),
    })  # fmt: skip
    assert_failed_cleanly(wait(runs["403"]), "403 Forbidden")
    assert set(hub.files("test-user/forbidden")) == {".gitattributes"}  # created, but nothing committed
    assert_failed_cleanly(wait(runs["hangs"]), "ReadTimeout", " --timeout 2")  # the command repeats the push as asked
    assert runs["hangs"]["seconds"] < 60  # --timeout 2, not the server's 30 s stall


def test_offline_mode_refuses_before_any_request(failures):
    run = failures["offline"]
    assert run["returncode"] == 1 and not run["connected"]
    assert "HF_HUB_OFFLINE is set, so hf_ddpm does not push and nothing was sent" in run["stderr"]
    assert f"unset HF_HUB_OFFLINE and run:\n    python -m hf_ddpm push {run['out']} --repo_id" in run["stderr"]
    assert tree_hashes(run["out"]) == run["before"]


def test_server_failure_modes(hub):
    """What hub.fail() promises the Hub tests (this file's and the Space demo's): a status, a dropped connection,
    a stall, each for `times` requests, after which the Hub answers again."""
    whoami = urllib.request.Request(hub.url + "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
    hub.clear()
    hub.fail("^GET /api/whoami-v2$", 503, times=1)
    hub.fail("^GET /api/whoami-v2$", "drop", times=1)
    hub.fail("^GET /api/whoami-v2$", "hang", times=1, seconds=5)
    with pytest.raises(urllib.error.HTTPError, match="503"):
        urllib.request.urlopen(whoami, timeout=10)
    with pytest.raises(http.client.RemoteDisconnected):
        urllib.request.urlopen(whoami, timeout=10)
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(whoami, timeout=0.5)
    with urllib.request.urlopen(whoami, timeout=10) as response:
        assert json.loads(response.read())["name"] == "test-user"
    assert len(hub.requests()) == 4
    hub.clear()
