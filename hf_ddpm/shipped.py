"""Where the folders that live outside the package in the source tree are found at run time.

pyproject.toml maps model_cards/ and examples/gradio_space/ into the wheel as hf_ddpm/model_cards and
hf_ddpm/gradio_space; a source checkout (editable installs included) keeps them at the top of the tree.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(packaged: str, source: str) -> Path:
    """hf_ddpm/<packaged> in an installed wheel, else <source> relative to the top of the source tree."""
    inside = PACKAGE_DIR / packaged
    return inside if inside.is_dir() else PACKAGE_DIR.parent / source
