"""Gradio Space for a DDPM pipeline: sample images while watching x_t and x̂_0, and get an uploaded image's bits/dim.

Run locally:  python app.py --model <Hub repo id or local pipeline directory>   (or set HF_DDPM_MODEL)
On a Space the model comes from HF_DDPM_MODEL, else from the first `models:` entry of this folder's README.md, at
the commit its `model_revision:` pins (the model's remote code runs here: a later commit runs only once pinned).
The pipeline loads with hf_ddpm when it is installed, else through diffusers' remote code (`trust_remote_code=True`):
a Space installs requirements.txt only, and a pushed hf_ddpm repo carries its own pipeline and scheduler modules.
"""

from __future__ import annotations

import os

# Before gradio is imported: it reads these at import time. No analytics, no version check, no Hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageOps  # noqa: E402
import torch  # noqa: E402

MAX_IMAGES = 16  # images per request
DEFAULT_STEPS = 100  # respaced sampling steps (Improved DDPM §4); the maximum is the model's T
MAX_MC_TIMESTEPS = 1000  # Monte Carlo timesteps K for bits/dim; K >= 2 so that a standard error exists
DEFAULT_MC_TIMESTEPS = 50
MAX_SEED = 2**32 - 1
NUM_PREVIEWS = 20  # progress updates per sampling run, about
PREVIEWS = ("sample", "pred_original_sample")  # x_t and x̂_0, as the pipeline's callback names them
PREVIEW_MIN_SIDE = 64  # previews are upscaled (nearest) to at least this many pixels per image
MAX_UPLOAD_BYTES = 5 * 2**20  # enforced by gradio at upload (launch(max_file_size=...))
MAX_UPLOAD_PIXELS = 4096 * 4096  # refuse larger images before decoding them
QUEUE_SIZE = 32  # waiting requests beyond this are refused with "queue full"
MODEL_ENV = "HF_DDPM_MODEL"
CSS = ".pixelated img { image-rendering: pixelated; }"  # small images scaled up stay sharp
CACHE_SECONDS = 3600  # gradio's copies of results, and ours, are deleted after this long


class ModelLoadError(RuntimeError):
    """The repo id or path does not give a loadable DDPM pipeline; the message says why."""


def readme_metadata() -> dict:
    """The front matter of the README.md beside this file ({} without one)."""
    readme = Path(__file__).with_name("README.md")
    if not readme.is_file():
        return {}
    from huggingface_hub import metadata_load

    return metadata_load(readme) or {}


def default_model(argument: str | None = None) -> str | None:
    """--model, else $HF_DDPM_MODEL, else the first `models:` entry of the README.md beside this file."""
    if argument:
        return argument
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    models = readme_metadata().get("models") or []
    return models[0] if models else None


def pinned_revision(model_id: str) -> str | None:
    """The README's `model_revision:` (the model commit this Space was pushed for) when `model_id` is its model."""
    metadata = readme_metadata()
    return metadata.get("model_revision") if (metadata.get("models") or [None])[0] == model_id else None


def load_pipeline(source: str | os.PathLike):
    """A DDPM pipeline from a local directory (save_pretrained's output) or a Hub repo id; ModelLoadError if not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    source = str(source).strip()
    if not source:
        raise ModelLoadError(f"no model given: pass --model <Hub repo id or local directory> or set {MODEL_ENV}")
    path, revision = Path(source).expanduser(), None  # a Hub model at the README's pinned commit, if it is that one
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{source!r} is not a pipeline directory (no model_index.json): give the directory that "
                "save_pretrained wrote, or a Hub repo id"
            )
        source = str(path)
    else:
        try:
            validate_repo_id(source)
        except HFValidationError:
            raise ModelLoadError(
                f"{source!r} is neither an existing directory nor a valid Hub repo id ('name' or 'namespace/name')"
            ) from None
        revision = pinned_revision(source)
    try:
        from hf_ddpm import HFDDPMPipeline as pipeline_class

        kwargs = {}
    except ImportError:  # a Space without hf_ddpm: the repo's own pipeline code
        from diffusers import DiffusionPipeline as pipeline_class

        kwargs = {"trust_remote_code": True}
    try:
        pipe = pipeline_class.from_pretrained(source, **kwargs, **({"revision": revision} if revision else {}))
    except Exception as err:
        raise ModelLoadError(_explain(source, err)) from err
    if not (hasattr(pipe, "bits_per_dim") and hasattr(pipe, "unet") and hasattr(pipe, "scheduler")):
        raise ModelLoadError(f"{source!r} holds a {type(pipe).__name__}, not a DDPM pipeline with bits_per_dim")
    if not hasattr(pipe, "model_to_pixels"):  # the pixel conversion the previews use comes with the pipeline's code
        raise ModelLoadError(f"{source!r} was saved by an hf_ddpm older than this app: save or push it again with it")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def _explain(source: str, err: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return f"{source!r} is gated on the Hub: accept its terms and set HF_TOKEN"
    if isinstance(err, RepositoryNotFoundError) or isinstance(err.__cause__, RepositoryNotFoundError):
        return f"no repo {source!r} on the Hub (check the id; a private repo needs HF_TOKEN)"
    return f"could not load a pipeline from {source!r}: {type(err).__name__}: {err}"


def preview_grid(pixels: torch.Tensor, padding: int = 2) -> PIL.Image.Image:
    """A near-square grid of a uint8 batch (B, C, H, W), upscaled (nearest) for display; the pipeline converts the
    model's [-1, 1] to pixels (`pipe.model_to_pixels`, hf_ddpm/images.py, carried by the repo's code).

    (hf_ddpm.images.make_grid does this for the package; a Space has only this file and requirements.txt.)
    """
    images = pixels.permute(0, 2, 3, 1).cpu().numpy()
    count, height, width, channels = images.shape
    rows = max(1, math.isqrt(count))
    cols = math.ceil(count / rows)
    grid = np.full((rows * (height + padding) + padding, cols * (width + padding) + padding, channels), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (height + padding), padding + (i % cols) * (width + padding)
        grid[top : top + height, left : left + width] = image
    scale = max(1, math.ceil(PREVIEW_MIN_SIDE / height))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)


class PngFiles:
    """Images for gradio as PNG files named by their content, written once, atomically (gradio copies a file into its
    cache atomically, but rewrites a PIL image's copy in place each time: an image shown twice could be served
    half-written). Files older than CACHE_SECONDS are deleted: gradio has its copy by then."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="ddpm_space_"))

    def __call__(self, image: PIL.Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        if not path.exists():
            staging = path.with_suffix(f".{threading.get_ident()}.tmp")
            staging.write_bytes(data)
            os.replace(staging, path)
            self._prune()
        return str(path)

    def _prune(self) -> None:
        cutoff = time.time() - CACHE_SECONDS
        for old in self.folder.glob("*.png"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)


def _as_int(name: str, value, low: int, high: int) -> int:
    """value as an int in [low, high], or a gr.Error that names the input and the allowed range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number) and low <= number <= high):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}; got {value!r}")
    return int(number)


class DemoModel:
    """The loaded pipeline (or why it failed to load) and the two actions of the demo, serialized by a lock."""

    def __init__(self, pipe, error: str | None = None):
        self.pipe, self.error = pipe, error
        self.lock = threading.Lock()  # the scheduler's timesteps are state: one request at a time
        self.png = PngFiles()
        self.height = self.width = self.channels = 0  # without a pipeline the UI still renders; actions say why
        self.num_train_timesteps = 1000
        if pipe is not None:
            size = pipe.unet.config.sample_size
            self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
            self.channels = pipe.unet.config.in_channels
            self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    def preview(self, x: torch.Tensor) -> str:
        """A PNG of the grid of x_t or x̂_0 (model range), for the progress view."""
        return self.png(preview_grid(self.pipe.model_to_pixels(x)))

    def _check_loaded(self):
        if self.pipe is None:
            raise gr.Error(f"No model loaded: {self.error}")

    def generate(self, steps, seed, num_images):
        """Sample images; yields (gallery, x_t preview, x̂_0 preview, status) every few steps, then the images."""
        self._check_loaded()
        steps = _as_int("Sampling steps", steps, 1, self.num_train_timesteps)
        seed = _as_int("Seed", seed, 0, MAX_SEED)
        num_images = _as_int("Number of images", num_images, 1, MAX_IMAGES)
        every = max(1, steps // NUM_PREVIEWS)
        updates, stop = queue.Queue(), threading.Event()

        def on_step(pipe, i, t, tensors):  # runs in the worker thread, after step i (timestep t)
            if stop.is_set():
                raise InterruptedError("request cancelled")
            total = len(pipe.scheduler.timesteps)  # Heun, PNDM, ... take more model calls than `steps`
            if (i + 1) % every == 0 or i + 1 == total:
                # x̂_0 only where the scheduler's step gives it (UniPC, DPM-Solver, PNDM do not): else x_t alone
                x_t, x_0 = (self.preview(tensors[k]) if k in tensors else None for k in PREVIEWS)
                updates.put(("step", (i + 1, total, float(t), x_t, x_0)))
            return {}

        def work():
            try:
                with self.lock:
                    out = self.pipe(
                        batch_size=num_images,
                        generator=torch.Generator().manual_seed(seed),
                        num_inference_steps=steps,
                        output_type="pil",
                        callback_on_step_end=on_step,
                    )
                updates.put(("done", [self.png(image) for image in out.images]))
            except BaseException as err:  # handed to the request's thread, which raises it
                updates.put(("error", err))

        threading.Thread(target=work, daemon=True, name="ddpm-sampling").start()
        try:
            x_t = x_0 = None
            while True:
                kind, payload = updates.get()
                if kind == "step":
                    done, total, t, x_t, x_0 = payload
                    note = "" if x_0 else f"; {type(self.pipe.scheduler).__name__} gives no predicted x_0"
                    yield gr.skip(), x_t, x_0, f"Step {done}/{total} (t = {t:g}){note}"
                elif kind == "done":
                    label = f"Done: {num_images} image(s), {steps} of {self.num_train_timesteps} steps, seed {seed}"
                    yield payload, x_t, x_0, label
                    return
                elif isinstance(payload, ValueError):
                    raise gr.Error(str(payload))
                else:
                    raise payload
        finally:
            stop.set()  # a closed connection ends the sampling thread at its next step

    def bits_per_dim(self, file, num_timesteps, crop_and_resize):
        """Bits/dim of an uploaded image: Monte Carlo estimate of the bound (DDPM eq. 5) with its standard error."""
        self._check_loaded()
        if not file:
            raise gr.Error("Upload an image first")
        num_timesteps = _as_int("Monte Carlo timesteps K", num_timesteps, 2, MAX_MC_TIMESTEPS)
        image = self._read_image(file, bool(crop_and_resize))
        with self.lock:
            generator = torch.Generator().manual_seed(0)  # the same upload gives the same estimate
            out = self.pipe.bits_per_dim([image], num_timesteps=num_timesteps, generator=generator)
        bpd, stderr = float(out.bits_per_dim[0]), float(out.standard_error[0])
        summary = (
            f"**{bpd:.3f} ± {stderr:.3f} bits/dim**\n\nMonte Carlo estimate of the variational bound (DDPM eq. 5) "
            f"from K = {num_timesteps} stratified timesteps of T = {self.num_train_timesteps}, plus the exact "
            "prior and decoder terms; ± is one standard error (conservative). Lower is better."
        )
        details = {
            "bits_per_dim": bpd,
            "standard_error": stderr,
            "prior_bpd": float(out.prior_bpd[0]),
            "decoder_bpd": float(out.decoder_bpd[0]),
            "num_timesteps": num_timesteps,
            "num_train_timesteps": self.num_train_timesteps,
        }
        scale = max(1, math.ceil(PREVIEW_MIN_SIDE / self.height))
        shown = image.resize((self.width * scale, self.height * scale), PIL.Image.Resampling.NEAREST)
        return summary, details, self.png(shown)

    def _read_image(self, file, crop_and_resize: bool) -> PIL.Image.Image:
        """The upload as a PIL image at the model's size and channel count, or a gr.Error saying what is wrong."""
        path = Path(file if isinstance(file, (str, os.PathLike)) else file.name)
        unreadable = f"{path.name} is not an image that Pillow can read (PNG, JPEG, WebP, ...)"
        try:
            opened = PIL.Image.open(path)
        except (OSError, PIL.Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
            raise gr.Error(unreadable) from None
        with opened:
            if opened.width * opened.height > MAX_UPLOAD_PIXELS:
                raise gr.Error(f"The image is {opened.width}x{opened.height}: too large to evaluate")
            try:
                image = opened.copy()  # decodes it
            except (OSError, ValueError):  # truncated or corrupt data
                raise gr.Error(unreadable) from None
        if image.size != (self.width, self.height):
            if not crop_and_resize:
                raise gr.Error(
                    f"The model evaluates {self.width}x{self.height} images; this one is {image.width}x"
                    f"{image.height}. Upload a {self.width}x{self.height} image or tick 'Center-crop and resize'."
                )
            image = PIL.ImageOps.fit(image, (self.width, self.height), PIL.Image.Resampling.BILINEAR)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[self.channels]
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            if mode != "RGBA":  # transparent pixels count as white, as in training (hf_ddpm.data)
                image = image.convert("RGBA")
                image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, "white"), image)
        return image.convert(mode)


def build_demo(pipe_or_path) -> gr.Blocks:
    """The Blocks app for a loaded pipeline or a repo id / local path (a load failure is shown, not raised)."""
    if pipe_or_path is None or isinstance(pipe_or_path, (str, os.PathLike)):
        name = str(pipe_or_path or "(none)")
        try:
            model = DemoModel(load_pipeline(pipe_or_path or ""))
        except ModelLoadError as err:
            model = DemoModel(None, str(err))
    else:
        pipe_or_path.set_progress_bar_config(disable=True)
        model, name = DemoModel(pipe_or_path), getattr(pipe_or_path, "name_or_path", "") or "in-memory pipeline"
    max_steps = model.num_train_timesteps

    with gr.Blocks(title="DDPM demo", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        shape = f" — {model.channels}×{model.height}×{model.width} images, T = {max_steps} training timesteps."
        gr.Markdown(
            f"# DDPM: denoising diffusion probabilistic models\nModel: `{name}`{shape if model.pipe is not None else ''}"
        )
        if model.error:
            gr.Markdown(f"**Could not load the model:** {model.error}", elem_id="load-error")
        with gr.Tab("Sample"):
            with gr.Row():
                # Numbers, not sliders: a slider clamps what is typed, a number lets the app say what is wrong.
                steps = gr.Number(
                    min(DEFAULT_STEPS, max_steps),
                    label="Sampling steps",
                    info=f"1 to {max_steps}: fewer steps sample a respaced chain (T = {max_steps})",
                )
                seed = gr.Number(0, label="Seed", info=f"0 to {MAX_SEED}: the same seed gives the same images")
                count = gr.Number(4, label="Number of images", info=f"1 to {MAX_IMAGES}")
            preview = {"format": "png", "elem_classes": "pixelated", "interactive": False}
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.Markdown("Pick steps, seed and count, then Generate.", label="status", elem_id="status")
            with gr.Row():
                x_t = gr.Image(label="x_t (current sample)", elem_id="x_t", height=240, **preview)
                x_0 = gr.Image(label="predicted x_0", elem_id="x_0", height=240, **preview)
            gallery = gr.Gallery(label="Samples", format="png", columns=8, elem_id="gallery", elem_classes="pixelated")
        with gr.Tab("Bits/dim of an image"):
            gr.Markdown(
                f"Upload a {model.width}x{model.height} image (PNG, JPEG, ...; up to {MAX_UPLOAD_BYTES // 2**20} MB). "
                "It is converted to the model's channels; another size is refused unless you tick "
                "'Center-crop and resize' (the bound is then that of the resized image)."
            )
            with gr.Row():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                shown = gr.Image(label="as evaluated", format="png", elem_classes="pixelated", elem_id="evaluated")
            with gr.Row():
                mc_steps = gr.Number(
                    DEFAULT_MC_TIMESTEPS,
                    label="Monte Carlo timesteps K",
                    info=f"2 to {MAX_MC_TIMESTEPS}: more gives a smaller standard error, slower",
                )
                crop = gr.Checkbox(False, label="Center-crop and resize")
            evaluate = gr.Button("Compute bits/dim", variant="primary", elem_id="evaluate")
            summary = gr.Markdown(label="bits/dim", elem_id="bpd")
            details = gr.JSON(label="details")

        shared = {"concurrency_limit": 1, "concurrency_id": "model"}  # one pipeline, one request at a time
        generate.click(model.generate, [steps, seed, count], [gallery, x_t, x_0, status], api_name="generate", **shared)
        evaluate.click(
            model.bits_per_dim, [upload, mc_steps, crop], [summary, details, shown], api_name="bits_per_dim", **shared
        )
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.model = model  # for tests and scripts
    return demo


def launch_kwargs() -> dict:
    """Arguments of demo.launch() that every launch uses (tests too)."""
    return {"max_file_size": MAX_UPLOAD_BYTES, "css": CSS, "show_error": True}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help=f"Hub repo id or local pipeline directory (default: ${MODEL_ENV})"
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    # One CPU thread on small machines: beside other load, two OpenMP threads on two cores sampled 4-20x slower
    parser.add_argument("--num_threads", type=int, default=os.environ.get("HF_DDPM_NUM_THREADS"),
                        help="CPU threads for sampling (default: $HF_DDPM_NUM_THREADS, else hf_ddpm.cpu's policy: "
                             "1 on a machine of <= 4 CPUs; 1 without hf_ddpm)")  # fmt: skip
    args = parser.parse_args(argv)
    try:  # this app owns the process: threads and glibc's allocator for UNet work (hf_ddpm/cpu.py)
        from hf_ddpm.cpu import tune_process
    except ImportError:  # a Space without hf_ddpm: threads only
        torch.set_num_threads(args.num_threads or 1)
    else:
        tune_process(args.num_threads)
    demo = build_demo(default_model(args.model))
    if demo.model.error:
        print(f"app.py: {demo.model.error}", flush=True)  # the page shows it too
    else:
        print(f"app.py: loaded {type(demo.model.pipe).__module__}.{type(demo.model.pipe).__name__}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs())


if __name__ == "__main__":
    main()
