"""Publishing the Gradio demo as a Space (hf_ddpm.space) to the local test Hub (tests/hub_server.py), then running the
pushed Space as a Space runs it: from its own files, in an environment without hf_ddpm, loading the model that its
README names through the repo's remote code, and answering gradio_client over HTTP.

huggingface_hub reads HF_ENDPOINT when it is imported, so every Hub client here runs in a subprocess.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from hub_clients import REPO, finish, make_bare_venv, start_script
from hub_server import HubServer
from huggingface_hub import metadata_load
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.hub import save_hub_pipeline
from hf_ddpm.remote_code import remote_files
from hf_ddpm.space import prepare_space

APP_DIR = REPO / "examples" / "gradio_space"
TOKEN = "hf_SpaceTestTokenNeverPushed0123"
MODEL_ID, SPACE_ID = "test-user/tiny-ddpm-for-space", "test-user/ddpm-demo"
MODULES = remote_files()
T, STEPS, SEED, COUNT = 20, 5, 3, 2


def start(server: HubServer, tmp: Path, *argv: str, token: str | None = TOKEN) -> subprocess.Popen:
    """`python ARGV...` with hf_ddpm importable, pointed at the test Hub; see `result`."""
    env = server.env(tmp, token) | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, *argv]
    return subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the Space exited ({process.returncode}):\n{process.communicate()[0]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Space did not serve {url} within {timeout} s")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=T))


@pytest.fixture(scope="module")
def pushed(hub, pipe, tmp_path_factory):
    """The model pushed with `python -m hf_ddpm push`, then its Space with `python -m hf_ddpm push-space`; meanwhile a
    Space pushed for a model that is not on the Hub (with `python -m hf_ddpm.space`, which takes the same flags)."""
    tmp = tmp_path_factory.mktemp("space_push")
    save_hub_pipeline(pipe, tmp / "model")
    orphan = start(hub, tmp, "-m", "hf_ddpm.space", "--space_id", "test-user/orphan", "--model_id", "test-user/nope")
    code, _, err = result(start(hub, tmp, "-m", "hf_ddpm", "push", str(tmp / "model"), "--repo-id", MODEL_ID))
    assert code == 0, err
    code, out, err = result(
        start(hub, tmp, "-m", "hf_ddpm", "push-space", "--space-id", SPACE_ID, "--model-id", MODEL_ID)
    )
    assert code == 0, err
    files, repo = hub.files(SPACE_ID, "space"), hub.repo(SPACE_ID, "space")
    pushed_commit = model_commit(hub)
    # A later commit to the model repo replaces its pipeline code (same file name) with code that must never run in
    # the Space: the Space runs (test_the_pushed_space_runs_...) at the commit it was pushed with.
    code, _, err = result(start(hub, tmp, "-c", TAMPER.format(repo_id=MODEL_ID, path=MODULES["pipeline"])))
    assert code == 0, err
    assert model_commit(hub) != pushed_commit
    return {"tmp": tmp, "stdout": out, "files": files, "repo": repo, "orphan": result(orphan), "commit": pushed_commit}


TAMPER = """
from huggingface_hub import upload_file
upload_file(path_or_fileobj=b"raise RuntimeError('tampered model code ran')\\n", path_in_repo={path!r},
            repo_id={repo_id!r}, commit_message="a later, unreviewed commit")
"""


def model_commit(hub: HubServer) -> str:
    """The commit hash of the model repo's main branch on the test Hub."""
    with urllib.request.urlopen(f"{hub.url}/api/models/{MODEL_ID}", timeout=30) as response:
        return json.loads(response.read())["sha"]


def test_the_space_repo_holds_the_app_with_its_model_in_the_front_matter(pushed, tmp_path):
    files = pushed["files"]
    assert sorted(files) == [".gitattributes", "README.md", "app.py", "requirements.txt"]  # no caches, no tests
    assert pushed["repo"]["sdk"] == "gradio"
    assert files["app.py"] == (APP_DIR / "app.py").read_bytes()
    (tmp_path / "README.md").write_bytes(files["README.md"])
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["models"] == [MODEL_ID]
    assert metadata["model_revision"] == pushed["commit"] and re.fullmatch(r"[0-9a-f]{40}", pushed["commit"])
    local = [name for name, data in files.items() if str(pushed["tmp"]).encode() in data or str(REPO).encode() in data]
    assert not local, local  # no path of the pushing machine in any file
    assert {k: metadata[k] for k in ("sdk", "app_file", "license")} == {
        "sdk": "gradio",
        "app_file": "app.py",
        "license": "apache-2.0",
    }
    assert f"/spaces/{SPACE_ID}" in pushed["stdout"]


def test_push_space_model_revision_pins_the_reviewed_commit_not_the_latest(hub, pushed, tmp_path):
    """After the later commit, a Space pushed with --model_revision <reviewed commit> pins that commit's hash."""
    space = "test-user/pinned"
    argv = ["-m", "hf_ddpm", "push-space", "--space_id", space, "--model_id", MODEL_ID]
    code, _, err = result(start(hub, tmp_path, *argv, "--model_revision", pushed["commit"]))
    assert code == 0, err
    (tmp_path / "README.md").write_bytes(hub.files(space, "space")["README.md"])
    assert metadata_load(tmp_path / "README.md")["model_revision"] == pushed["commit"] != model_commit(hub)


def test_the_pushed_space_runs_without_hf_ddpm_and_samples_what_hf_ddpm_samples(hub, pushed, pipe, tmp_path):
    from gradio_client import Client, handle_file

    upload = tmp_path / "upload.png"  # an 8x8 RGB image, the model's size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(upload)

    space_dir = tmp_path / "space"  # the Space's checkout: its files only
    for name, data in pushed["files"].items():
        (space_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (space_dir / name).write_bytes(data)
    python = make_bare_venv(tmp_path)
    env = hub.env(tmp_path, None)  # a public model: no token; HF_DDPM_MODEL unset, so the README names the model
    missing = start_script(
        python,
        """
        import app
        try:
            app.load_pipeline("test-user/no-such-model")
        except app.ModelLoadError as err:
            print(err)
        """,
        env,
        space_dir,
    )
    latest = start_script(  # the model's latest commit, in a cache of its own: it runs the tampered code
        python,
        f"""
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained({MODEL_ID!r}, trust_remote_code=True)
        except RuntimeError as err:
            print(err)
        """,
        hub.env(tmp_path / "latest", None),
        space_dir,
    )
    port = free_port()
    command = [python, "app.py", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=space_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", process)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, *_, status = client.predict(STEPS, SEED, COUNT, api_name="/generate")
        summary = client.predict(handle_file(upload), 10, False, api_name="/bits_per_dim")[0]
    finally:
        process.terminate()
        log = process.communicate(timeout=30)[0].decode()
    assert "loaded diffusers_modules." in log and "hf_ddpm.pipeline" not in log, log  # the repo's remote code
    assert status == f"Done: {COUNT} image(s), {STEPS} of {T} steps, seed {SEED}"
    served = np.stack([np.asarray(Image.open(item["image"])) for item in gallery])  # (N, 8, 8, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Space process (OMP_NUM_THREADS=1)
    try:
        generator = torch.Generator().manual_seed(SEED)
        local = pipe(batch_size=COUNT, generator=generator, num_inference_steps=STEPS, output_type="pil").images
    finally:
        torch.set_num_threads(threads)
    local = np.stack([np.asarray(im) for im in local])
    assert served.shape == local.shape == (COUNT, 8, 8, 3)
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1  # same model, same seed: same images
    assert "bits/dim" in summary
    assert "no repo 'test-user/no-such-model' on the Hub" in finish(missing)
    assert "tampered model code ran" in finish(latest)  # what the Space would have run without its pin
    assert "tampered" not in log


def test_a_space_for_a_private_model_is_pushed_with_a_note_that_it_needs_a_token_secret(hub, pushed, tmp_path):
    """The Space's first load of a private model fails without an HF_TOKEN secret: said when it is pushed (a public
    model's push says nothing of it: test_the_space_repo_holds_...)."""
    model = "test-user/private-model"
    code, _, err = result(start(hub, tmp_path, "-m", "hf_ddpm", "push", str(pushed["tmp"] / "model"), "--repo_id",
                                model, "--private"))  # fmt: skip
    assert code == 0, err
    code, out, err = result(start(hub, tmp_path, "-m", "hf_ddpm", "push-space", "--space_id", "test-user/private-demo",
                                  "--model_id", model))  # fmt: skip
    assert code == 0 and hub.files("test-user/private-demo", "space") is not None, err
    assert out.splitlines()[-1] == (f"note: the model repo {model} is private: the Space loads it only once given an "
                                    "HF_TOKEN secret that can read it (the Space's settings, Variables and secrets)")  # fmt: skip
    assert "note:" not in pushed["stdout"] and "Warning" not in err


def test_pushing_a_space_for_a_missing_model_says_to_push_the_model_first(hub, pushed):
    code, _, err = pushed["orphan"]
    assert code == 1
    assert "model repo 'test-user/nope' not found" in err and "push the model before its Space" in err
    assert hub.repo("test-user/orphan", "space") is None  # nothing created


def test_prepare_space_copies_the_app_and_names_the_model(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text("print('demo')\n")
    (app_dir / "README.md").write_text("---\ntitle: Demo\nsdk: gradio\nmodels:\n- old/model\n---\n\n# Demo\nbody\n")
    (app_dir / "__pycache__").mkdir()
    (app_dir / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    out = prepare_space(app_dir, "someone/new-model", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py"]
    assert metadata_load(out / "README.md") == {"title": "Demo", "sdk": "gradio", "models": ["someone/new-model"]}
    assert (out / "README.md").read_text().endswith("\n# Demo\nbody\n")
    assert "old/model" in (app_dir / "README.md").read_text()  # the source folder is left as it was


def test_prepare_space_refuses_what_a_space_cannot_use(tmp_path):
    from huggingface_hub.errors import HFValidationError

    with pytest.raises(HFValidationError):
        prepare_space(APP_DIR, "./outputs/local-model", tmp_path / "a")  # a Space loads from the Hub
    with pytest.raises(FileNotFoundError, match="no README.md"):
        prepare_space(tmp_path, "someone/model", tmp_path / "b")
    (tmp_path / "README.md").write_text("---\nsdk: docker\n---\n")
    with pytest.raises(ValueError, match="must say `sdk: gradio`, got sdk='docker'"):
        prepare_space(tmp_path, "someone/model", tmp_path / "c")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set, so hf_ddpm does not push and nothing was sent"),
        ({}, "no Hugging Face token"),
    ],
)
def test_push_space_has_the_push_guards_before_any_request(hub, tmp_path, env, match):
    hub.clear()
    argv = ["-m", "hf_ddpm", "push-space", "--space-id", "test-user/guarded", "--model-id", MODEL_ID]
    token = TOKEN if env else None  # offline: the token is there, the guard still refuses
    process = subprocess.Popen(
        [sys.executable, *argv],
        env=hub.env(tmp_path, token) | {"PYTHONPATH": str(REPO)} | env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, _, err = result(process)
    assert code == 1 and match in err, err
    assert "python -m hf_ddpm push-space --space_id test-user/guarded --model_id " + MODEL_ID in err
    assert hub.requests() == []  # refused before any request


@pytest.mark.parametrize(
    "stalls",
    [
        r"^GET /api/models/",  # the model check: huggingface_hub's info calls pass their own timeout (None)
        r"^POST /api/repos/create",  # create_repo is not retried
    ],
)
def test_a_stalled_space_push_fails_within_the_timeout_and_says_how_to_push_again(hub, pushed, tmp_path, stalls):
    hub.clear()
    hub.fail(stalls, mode="hang", seconds=60)
    argv = ["-m", "hf_ddpm", "push-space", "--space-id", "test-user/stalled", "--model-id", MODEL_ID, "--timeout", "2"]
    started = time.monotonic()
    code, _, err = result(start(hub, tmp_path, *argv))
    hub.clear()
    assert code == 1 and time.monotonic() - started < 30, err
    assert "pushing the Space test-user/stalled failed" in err and "To push it again, run:" in err
    assert f"python -m hf_ddpm push-space --space_id test-user/stalled --model_id {MODEL_ID} --timeout 2\n" in err
    assert TOKEN not in err and hub.repo("test-user/stalled", "space") is None


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--app-dir", "EMPTY"], "has no README.md: a Space needs one with its front matter"),
        (["--space-id", "not a/valid id"], "--space_id 'not a/valid id' is not a valid Hub repo id: Repo id must"),
        (["--model-id", "./a/local/path"], "--model_id './a/local/path' is not a valid Hub repo id: Repo id must"),
    ],
)
def test_a_bad_space_push_is_refused_before_any_request(hub, tmp_path, flags, match):
    """A bad app folder or id fails with one error line and exit status 1, before the Hub hears anything."""
    hub.clear()
    (tmp_path / "EMPTY").mkdir()
    given = {"--space-id": "test-user/refused", "--model-id": MODEL_ID, **dict(zip(flags[::2], flags[1::2]))}
    argv = ["-m", "hf_ddpm", "push-space", *(part for item in given.items() for part in item)]
    code, out, err = result(start(hub, tmp_path, *argv))
    assert code == 1 and err.startswith("error: ") and match in err and out == "", err
    assert hub.requests() == []


def test_the_command_to_push_a_space_again_repeats_its_pin_message_and_timeout():
    """A retry that dropped --model_revision would pin the model's latest commit instead of the one asked for."""
    from hf_ddpm.space import DEFAULT_APP_DIR, space_retry_command

    command = space_retry_command("me/demo", "me/model", DEFAULT_APP_DIR, True, model_revision="v1.0",
                                  commit_message="pin v1", timeout=5)  # fmt: skip
    assert command == ("python -m hf_ddpm push-space --space_id me/demo --model_id me/model --model_revision v1.0 "
                       "--commit_message 'pin v1' --timeout 5 --private")  # fmt: skip


def test_an_invalid_space_id_is_named_before_the_offline_and_token_guards(monkeypatch, tmp_path):
    """Their messages print a command to push later: one with an id that can never work is not printed."""
    from hf_ddpm.space import DEFAULT_APP_DIR, push_space

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"^--space_id 'a/b/c' is not a valid Hub repo id: "):
        push_space(DEFAULT_APP_DIR, "a/b/c", MODEL_ID)
