"""Client-side helpers of the Hub tests: processes that talk to the test Hub (tests/hub_server.py), a virtual
environment without hf_ddpm, and fingerprints of output directories."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path: equal before and after means nothing was written."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def make_bare_venv(directory: Path) -> str:
    """A virtual environment that sees this environment's packages (torch, diffusers) but not hf_ddpm; its python.

    A .pth line puts our site-packages on sys.path without processing the .pth files inside it, so an editable
    install of hf_ddpm is not importable there; run it outside the repo checkout and without PYTHONPATH.
    """
    venv = directory / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", query], check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "main_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def start_script(python: str, code: str, env: dict, cwd: Path, *args: str) -> subprocess.Popen:
    """Run `code` (dedented) as a script file with `python`, without waiting; see `finish`."""
    script = cwd / f"script_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    command = [python, str(script), *args]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a `start_script` process, require success, return its stdout."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"subprocess failed:\n{out.decode()}\n{err.decode()}"
    return out.decode()
