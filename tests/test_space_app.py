"""The Gradio Space (examples/gradio_space/app.py) served on 127.0.0.1 and driven in Debian's Chromium by Playwright,
and through gradio_client: sampling with a live progress view, bits/dim of an upload, errors that leave it serving.

Chromium comes from Debian (/usr/bin/chromium, installed here with apt when missing; never `playwright install`).
Screenshots go to $PYTEST_ARTIFACTS or tests/artifacts/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config
from hf_ddpm.data import load_data

REPO = Path(__file__).resolve().parents[1]
APP_PATH = REPO / "examples" / "gradio_space" / "app.py"
ARTIFACTS = Path(os.environ.get("PYTEST_ARTIFACTS") or REPO / "tests" / "artifacts")
CHROMIUM = "/usr/bin/chromium"
# No sandbox (we run as root); none of Chromium's own network traffic, which this machine refuses anyway.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
T = 50  # training timesteps of the tiny pipeline
SIZE = 16  # 1 x 16 x 16 images
WAIT_MS = 180_000  # the machine is shared: generous timeouts (a run takes seconds when it has the CPU)


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when it is missing (the tests run as root in CI)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and this user cannot apt-get install it: run `apt-get install chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = ["-o", "DPkg::Lock::Timeout=600"]  # another apt run may hold the lock
    for command in (["apt-get", *lock_wait, "update"], ["apt-get", *lock_wait, "install", "-y", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return CHROMIUM


def load_app_module():
    spec = importlib.util.spec_from_file_location("gradio_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_pipeline(path: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny", sample_size=SIZE, in_channels=1, out_channels=1))
    HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=T)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # read when components are built
        yield load_app_module()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Uploads: a real held-out digit, an image of the wrong size, a text file, a text file named .png."""
    tmp = tmp_path_factory.mktemp("uploads")
    digit = load_data(resolution=SIZE).eval[0, 0].numpy()  # uint8 (16, 16)
    Image.fromarray(digit, "L").save(tmp / "digit.png")
    Image.new("RGB", (24, 20), "gray").save(tmp / "wrong_size.png")
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "fake.png").write_text("not a png either")
    return {p.stem: p for p in tmp.iterdir()}


@pytest.fixture(scope="module")
def server(app, tmp_path_factory):
    """The app for a tiny saved pipeline, launched in this process on a free port; yields its URL."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core machine: one thread is much faster
    demo = app.build_demo(str(save_tiny_pipeline(tmp_path_factory.mktemp("space") / "pipeline")))
    assert demo.model.error is None
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, **app.launch_kwargs()
    )
    yield url
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.set_default_timeout(WAIT_MS)
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url)
    page.locator("#generate").wait_for()
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def fill(page, label: str, value) -> None:
    page.get_by_label(label, exact=True).fill(str(value))


def expect_error(page, text: str) -> None:
    """An error toast containing `text` is shown; then every toast is closed."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("toast-text").filter(has_text=text).first).to_be_visible(timeout=WAIT_MS)
    for button in page.get_by_test_id("toast-close").all():
        button.click()


def upload(page, path: Path) -> None:
    """Set the upload's file and wait until the page shows it as uploaded."""
    page.locator("#upload input[type=file]").set_input_files(path)
    page.locator("#upload .file-preview").get_by_text(path.stem).wait_for()


def generate_in_page(page, steps: int, seed: int, count: int) -> None:
    from playwright.sync_api import expect

    fill(page, "Sampling steps", steps)
    fill(page, "Seed", seed)
    fill(page, "Number of images", count)
    page.locator("#generate").click()
    done = f"Done: {count} image(s), {steps} of {T} steps, seed {seed}"
    expect(page.locator("#status")).to_contain_text(done, timeout=WAIT_MS)  # expect's own default is 5 s
    expect(page.locator("#gallery img")).to_have_count(count, timeout=WAIT_MS)


def loaded_image_sizes(page, selector: str) -> list[list[int]]:
    """(naturalWidth, naturalHeight) of the images under `selector`, once every one has loaded."""
    page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('{selector}')).every(i => i.complete && i.naturalWidth > 0)"
    )
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")


# Records every status text and x_t image address the page shows, however briefly, from now on.
RECORD_PROGRESS = """() => {
  window.seen = [];
  const record = () => window.seen.push([document.querySelector('#status')?.innerText || '',
                                         document.querySelector('#x_t img')?.getAttribute('src') || '']);
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                      attributes: true, attributeFilter: ['src']});
}"""


def test_generate_in_the_browser_shows_progress_then_the_images(page, server):
    page.evaluate(RECORD_PROGRESS)
    generate_in_page(page, steps=T, seed=7, count=9)
    seen = page.evaluate("window.seen")
    steps_shown = {text for text, _ in seen if text.startswith("Step ")}
    previews = {src for _, src in seen if src}
    assert len(steps_shown) >= 2, f"the progress view did not update: {sorted(steps_shown)}"
    assert len(previews) >= 2, "the x_t preview did not change during sampling"
    assert f"Step {T}/{T} (t = 0)" in steps_shown
    assert loaded_image_sizes(page, "#gallery img") == [[SIZE, SIZE]] * 9
    side = 4 * (3 * (SIZE + 2) + 2)  # the previews: a 3 x 3 grid with 2-pixel gaps, upscaled 4x
    assert loaded_image_sizes(page, "#x_t img") == loaded_image_sizes(page, "#x_0 img") == [[side, side]]
    screenshot(page, "space_generate.png")
    outside = {url for url in page.requested if not url.startswith((server, "data:", "blob:"))}
    assert not outside, f"the page requested addresses outside the app: {sorted(outside)}"


def test_uploaded_image_gets_its_bits_per_dim(page, files):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Bits/dim of an image").click()
    upload(page, files["digit"])
    fill(page, "Monte Carlo timesteps K", 20)
    page.locator("#evaluate").click()
    expect(page.locator("#bpd")).to_contain_text("bits/dim", timeout=WAIT_MS)
    value, stderr = map(
        float, re.search(r"(\d+\.\d+) ± (\d+\.\d+) bits/dim", page.locator("#bpd").inner_text()).groups()
    )
    assert 0 < value < 100 and 0 < stderr < value
    assert loaded_image_sizes(page, "#evaluated img") == [[4 * SIZE, 4 * SIZE]]  # shown upscaled 4x
    screenshot(page, "space_bits_per_dim.png")


def test_bad_inputs_show_errors_and_the_app_keeps_serving(page, files):
    for label, value, message in [
        ("Sampling steps", 0, f"Sampling steps must be a whole number from 1 to {T}; got 0"),
        ("Sampling steps", T + 1, f"Sampling steps must be a whole number from 1 to {T}; got {T + 1}"),
        ("Sampling steps", 2.5, "got 2.5"),
        ("Number of images", 17, "Number of images must be a whole number from 1 to 16; got 17"),
    ]:
        fill(page, label, value)
        page.locator("#generate").click()
        expect_error(page, message)
        fill(page, label, 4)

    page.get_by_role("tab", name="Bits/dim of an image").click()
    upload(page, files["wrong_size"])
    page.locator("#evaluate").click()
    expect_error(page, f"The model evaluates {SIZE}x{SIZE} images; this one is 24x20")
    page.locator("#upload").get_by_label("Clear").click()
    page.locator("#upload input[type=file]").set_input_files(files["notes"])  # refused by the page itself
    expect_error(page, "Invalid file type: notes.txt")
    upload(page, files["fake"])  # an image by its name only
    page.locator("#evaluate").click()
    page.get_by_test_id("toast-text").filter(has_text="fake.png is not an image").wait_for()
    screenshot(page, "space_error.png")
    expect_error(page, "fake.png is not an image that Pillow can read")
    page.locator("#upload").get_by_label("Clear").click()
    upload(page, files["digit"])
    fill(page, "Monte Carlo timesteps K", 1)
    page.locator("#evaluate").click()
    expect_error(page, "Monte Carlo timesteps K must be a whole number from 2 to 1000; got 1")

    page.get_by_role("tab", name="Sample").click()
    generate_in_page(page, steps=5, seed=1, count=2)  # still serving
    assert loaded_image_sizes(page, "#gallery img") == [[SIZE, SIZE]] * 2


def test_a_bad_model_path_is_shown_and_every_action_reports_it(app, browser, tmp_path):
    demo = app.build_demo(str(tmp_path / "no-such-model"))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = open_page(browser, url)
        message = "is neither an existing directory nor a valid Hub repo id"
        assert message in page.locator("#load-error").inner_text()
        page.locator("#generate").click()
        expect_error(page, "No model loaded")
        page.close()
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------- gradio_client


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def client_images(result) -> list[np.ndarray]:
    gallery = result[0]
    return [np.asarray(Image.open(item["image"])) for item in gallery]


def test_client_generate_same_seed_gives_identical_images_of_the_model_size(client):
    first = client.predict(10, 3, 3, api_name="/generate")
    second = client.predict(10, 3, 3, api_name="/generate")
    other = client.predict(10, 4, 3, api_name="/generate")
    images = client_images(first)
    assert [im.shape for im in images] == [(SIZE, SIZE)] * 3  # mode L, the UNet's sample_size
    assert all(np.array_equal(a, b) for a, b in zip(images, client_images(second)))
    assert not np.array_equal(images[0], client_images(other)[0])
    assert first[3] == f"Done: 3 image(s), 10 of {T} steps, seed 3"
    # Two requests at once are queued, one at a time on the one pipeline: each gets what it asked for.
    jobs = [client.submit(20, 3, 3, api_name="/generate"), client.submit(10, 3, 3, api_name="/generate")]
    longer, same = (job.result(timeout=WAIT_MS / 1000) for job in jobs)
    assert longer[3] == f"Done: 3 image(s), 20 of {T} steps, seed 3"
    assert all(np.array_equal(a, b) for a, b in zip(images, client_images(same)))
    assert Image.open(first[1]).size == (4 * (3 * (SIZE + 2) + 2), 4 * (SIZE + 4))  # x_t: a 1 x 3 grid, upscaled 4x


def test_client_bits_per_dim_is_reproducible(client, files):
    from gradio_client import handle_file

    summary, details, shown = client.predict(handle_file(files["digit"]), 20, False, api_name="/bits_per_dim")
    again = client.predict(handle_file(files["digit"]), 20, False, api_name="/bits_per_dim")[1]
    assert details == again  # the Monte Carlo draw is seeded
    assert details["num_timesteps"] == 20 and details["num_train_timesteps"] == T
    assert 0 < details["standard_error"] < details["bits_per_dim"]
    assert f"{details['bits_per_dim']:.3f} ± {details['standard_error']:.3f} bits/dim" in summary
    resized = client.predict(handle_file(files["wrong_size"]), 20, True, api_name="/bits_per_dim")[1]
    assert resized["bits_per_dim"] > 0  # center-cropped and resized on request


def test_client_out_of_range_values_are_refused_with_their_name(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(5 * 2**20 + 1))  # just over the upload limit
    with pytest.raises(ValueError, match="exceeds the maximum file size of 5242880 bytes"):
        client.predict(handle_file(big), 10, False, api_name="/bits_per_dim")
    with pytest.raises(AppError, match=r"Number of images must be a whole number from 1 to 16; got 100"):
        client.predict(10, 0, 100, api_name="/generate")
    with pytest.raises(AppError, match=r"Seed must be a whole number from 0 to 4294967295; got -1"):
        client.predict(10, -1, 1, api_name="/generate")
    assert len(client_images(client.predict(2, 0, 1, api_name="/generate"))) == 1  # and it keeps serving


# ---------------------------------------------------------------------------------------------- without a server


def test_nothing_is_sent_outside(app, server):
    import gradio as gr

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set by app.py before gradio was imported
    assert gr.Blocks().analytics_enabled is False


def test_load_errors_say_what_is_wrong(app, tmp_path):
    (tmp_path / "empty").mkdir()
    for source, message in [
        ("", "no model given"),
        (str(tmp_path / "missing"), "neither an existing directory nor a valid Hub repo id"),
        (str(tmp_path / "empty"), "not a pipeline directory \\(no model_index.json\\)"),
        ("not a repo id!", "neither an existing directory nor a valid Hub repo id"),
    ]:
        with pytest.raises(app.ModelLoadError, match=message):
            app.load_pipeline(source)


def test_default_model_comes_from_the_argument_the_environment_or_the_readme(app, monkeypatch):
    monkeypatch.delenv("HF_DDPM_MODEL", raising=False)
    readme_model = app.default_model()
    assert readme_model and "/" in readme_model  # the README's models: entry
    monkeypatch.setenv("HF_DDPM_MODEL", "someone/env-model")
    assert app.default_model() == "someone/env-model"
    assert app.default_model("someone/arg-model") == "someone/arg-model"


def test_preview_grid_tiles_and_upscales(app):
    x = torch.linspace(-2, 2, 5 * 16 * 16).reshape(5, 1, 16, 16)  # beyond the model range [-1, 1] at both ends
    grid = app.preview_grid(HFDDPMPipeline.model_to_pixels(x))  # as the app converts it (hf_ddpm/images.py)
    assert grid.mode == "L" and grid.size == (4 * (3 * 18 + 2), 4 * (2 * 18 + 2))  # 2 rows x 3 columns, x4
    assert np.asarray(grid).min() == 0 and np.asarray(grid).max() == 255  # clamped to [-1, 1]


@pytest.mark.parametrize(
    "name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "DDIMScheduler"]
)
def test_generate_previews_with_a_scheduler_that_gives_no_predicted_x0(app, tmp_path, name):
    """Any scheduler of HFDDPMScheduler.compatibles samples in the app: x_t is previewed every few steps, x̂_0 where
    the step gives it (DDIM) and nothing in its place where it does not (UniPC, DPM-Solver, PNDM), and the final
    images are the pipeline's for that seed."""
    import diffusers

    pipe = HFDDPMPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "pipeline"))
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    model = app.DemoModel(pipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        *progress, (gallery, x_t, x_0, status) = model.generate(10, 5, 2)
        expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10).images
    finally:
        torch.set_num_threads(threads)
    total = len(pipe.scheduler.timesteps)  # PNDM's warm-up makes more model calls than 10
    assert status == f"Done: 2 image(s), 10 of {T} steps, seed 5"
    assert len(gallery) == 2 and all(np.array_equal(np.asarray(Image.open(a)), b) for a, b in zip(gallery, expected))
    assert progress and all(Path(p[1]).is_file() for p in progress)
    gives_x0 = name == "DDIMScheduler"
    note = "" if gives_x0 else f"; {name} gives no predicted x_0"
    assert progress[-1][3] == f"Step {total}/{total} (t = {float(pipe.scheduler.timesteps[-1]):g}){note}"
    assert all((p[2] is not None) == gives_x0 for p in progress) and (x_0 is not None) == gives_x0
    assert x_t == progress[-1][1]
