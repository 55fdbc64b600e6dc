"""Publishing the Gradio demo as a Hugging Face Space: copy the app folder, point it at a model repo, upload it.

    python -m hf_ddpm.space --space_id you/ddpm-demo --model_id you/ddpm-digits [--app_dir examples/gradio_space]

The Space's app reads its model from the first `models:` entry of its README front matter (unless the Space sets
HF_DDPM_MODEL), so that entry is the one place the model id is written; it also links the Space to the model page.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, metadata_load, metadata_save
from huggingface_hub.utils import validate_repo_id

from .shipped import shipped_dir

__all__ = ["DEFAULT_APP_DIR", "prepare_space", "push_space"]

DEFAULT_APP_DIR = shipped_dir("gradio_space", "examples/gradio_space")
SPACE_IGNORE = ("__pycache__", "*.pyc", ".gradio", "flagged", ".DS_Store")  # never uploaded


def prepare_space(app_dir: str | Path, model_id: str, out_dir: str | Path) -> Path:
    """Copy the Space folder `app_dir` to `out_dir` with `models: [model_id]` in its README front matter.

    app_dir must hold README.md with Space front matter (`sdk: gradio`) and the `app_file` it names.
    """
    app_dir, out_dir = Path(app_dir), Path(out_dir)
    validate_repo_id(model_id)  # the Space loads it from the Hub: a local path will not do
    readme = app_dir / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"{app_dir} has no README.md: a Space needs one with its front matter")
    metadata = metadata_load(readme) or {}
    if metadata.get("sdk") != "gradio":
        raise ValueError(f"{readme} front matter must say `sdk: gradio`, got sdk={metadata.get('sdk')!r}")
    app_file = metadata.get("app_file", "app.py")
    if not (app_dir / app_file).is_file():
        raise FileNotFoundError(f"{app_dir} has no {app_file} (the README's app_file)")
    shutil.copytree(app_dir, out_dir, ignore=shutil.ignore_patterns(*SPACE_IGNORE), dirs_exist_ok=True)
    metadata_save(out_dir / "README.md", {**metadata, "models": [model_id]})
    return out_dir


def push_space(
    app_dir: str | Path,
    space_id: str,
    model_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Create (or reuse) the Gradio Space `space_id` and upload `app_dir` to it, set to load `model_id`.

    The model repo must already exist (push it first); a private model needs the Space to have an HF_TOKEN secret.
    Returns the Space's URL.
    """
    api = HfApi(token=token)
    validate_repo_id(space_id)
    validate_repo_id(model_id)
    if not api.repo_exists(model_id):
        raise ValueError(f"model repo {model_id!r} not found on {api.endpoint}: push the model before its Space")
    url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_ddpm_space_") as tmp:
        folder = prepare_space(app_dir, model_id, tmp)
        api.upload_folder(
            repo_id=url.repo_id,
            repo_type="space",
            folder_path=folder,
            commit_message=commit_message or f"Gradio demo of {model_id}",
        )
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Upload the Gradio demo as a Hugging Face Space for a model repo.")
    parser.add_argument("--space_id", required=True, help="namespace/name of the Space")
    parser.add_argument("--model_id", required=True, help="the model repo the Space loads (pushed already)")
    parser.add_argument("--app_dir", default=str(DEFAULT_APP_DIR), help="default: examples/gradio_space")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the saved login")
    args = parser.parse_args(argv)
    try:
        url = push_space(args.app_dir, args.space_id, args.model_id, token=args.token, private=args.private)
    except (ValueError, OSError) as err:  # HfHubHTTPError and HFValidationError are among these
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.app_dir} to the Space {args.space_id} (model {args.model_id}): {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
