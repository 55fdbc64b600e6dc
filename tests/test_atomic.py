"""hf_ddpm/atomic.py: the one home of atomic writes and staging names (checkpoints, samples, summary, manifest,
the pipeline swap). A process killed mid-write (a real SIGKILL) leaves the old file and only its staging sibling."""

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from diffusers import UNet2DModel

from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, atomic, hub, unet_config
from hf_ddpm.atomic import is_staging, remove_dir, replace_dir, staging_name, swap_in, write_atomically
from hf_ddpm.hub import PIPELINE_REPLACED, PIPELINE_STAGING
from hf_ddpm.training import checkpoints, output_dir

REPO = Path(__file__).resolve().parent.parent


def test_staging_names_are_the_ones_runs_leave_and_clean_up():
    assert staging_name("out/samples.png") == os.path.join("out", "samples.png.tmp")
    assert staging_name(Path("out") / "checkpoint-4") == os.path.join("out", "checkpoint-4.tmp")
    assert staging_name("metrics.json", unique=True) == f"metrics.json.tmp-{os.getpid()}"
    # the names existing runs and tests know (tests/fault_hooks.py, tests/test_faults.py)
    assert (PIPELINE_STAGING, PIPELINE_REPLACED) == (".pipeline.tmp", ".pipeline-old.tmp")
    assert atomic.TMP_SUFFIX == ".tmp"  # the suffix of every staging name, checkpoints' included
    assert set(checkpoints.INCOMPLETE_NAMES) == {
        ".pipeline.tmp",
        ".pipeline-old.tmp",
        "samples.png.tmp",
        "training_summary.json.tmp",
    }
    assert {".hf_ddpm-manifest.json.tmp", *checkpoints.INCOMPLETE_NAMES} <= set(output_dir.RUN_PATTERNS)


@pytest.mark.parametrize(
    ("name", "staging"),
    [
        ("checkpoint-3.tmp", True),
        ("/runs/out/checkpoint-3.tmp/", True),
        (".pipeline.tmp", True),
        (f"metrics.json.tmp-{os.getpid()}", True),
        ("checkpoint-3", False),
        ("notes.tmpl", False),
        ("x.tmp-abc", False),
        ("tmp", False),
    ],
)
def test_is_staging_tells_staging_names_from_complete_ones(name, staging):
    assert is_staging(name) is staging


def test_write_atomically_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_atomically(path, lambda f: f.write("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
    write_atomically(str(tmp_path / "grid.png"), lambda f: f.write(b"\x89PNG"), "wb")
    assert (tmp_path / "grid.png").read_bytes() == b"\x89PNG"
    write_atomically(path, lambda f: f.write("mine"), unique=True)
    assert path.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["grid.png", "summary.json"]


def test_write_atomically_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append(("replace", a, b)) or replace(a, b))
    write_atomically(tmp_path / "a.txt", lambda f: f.write("x"))
    assert calls == ["fsync", ("replace", str(tmp_path / "a.txt.tmp"), tmp_path / "a.txt")]


def test_a_failed_write_keeps_the_old_file_and_removes_its_staging_file(tmp_path):
    path = tmp_path / "samples.png"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fail, "wb")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["samples.png"]


def test_a_process_killed_mid_write_leaves_the_old_file_and_its_staging_sibling(tmp_path):
    """A real SIGKILL while the new content is half written: the name still holds the old content, whole, and the
    only other file is `path.tmp`, which checkpoints.remove_incomplete deletes at the next start."""
    path = tmp_path / "training_summary.json"
    path.write_text('{"old": true}')
    marker = tmp_path / "marker"
    script = textwrap.dedent(
        f"""
        import time
        from hf_ddpm.atomic import write_atomically

        def write(f):
            f.write('{{"new": ')
            f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(600)

        write_atomically({str(path)!r}, write)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    assert path.read_text() == '{"old": true}'
    assert (tmp_path / "training_summary.json.tmp").read_text() == '{"new": '
    marker.unlink()
    checkpoints.remove_incomplete(str(tmp_path))
    assert os.listdir(tmp_path) == ["training_summary.json"]


def test_replace_dir_swaps_in_a_whole_folder(tmp_path):
    staged, final = tmp_path / "checkpoint-4.tmp", tmp_path / "checkpoint-4"
    staged.mkdir()
    (staged / "model.safetensors").write_text("first")
    replace_dir(staged, final)
    assert (final / "model.safetensors").read_text() == "first" and os.listdir(tmp_path) == ["checkpoint-4"]
    staged.mkdir()  # the same step again (an earlier attempt of the run wrote it): the new one replaces it
    (staged / "model.safetensors").write_text("second")
    replace_dir(staged, final)
    assert (final / "model.safetensors").read_text() == "second" and os.listdir(tmp_path) == ["checkpoint-4"]


def test_remove_dir_killed_while_deleting_leaves_no_folder_under_its_name(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "optimizer.bin").write_text("x")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill: rmtree never finishes

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(folder)
    assert os.listdir(tmp_path) == ["checkpoint-2.tmp"]
    assert checkpoints.list_checkpoints(str(tmp_path)) == []  # never taken for a complete checkpoint
    monkeypatch.undo()
    checkpoints.remove_incomplete(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_remove_path_removes_a_file_a_folder_or_a_link_and_never_what_a_link_points_to(tmp_path):
    from hf_ddpm.atomic import remove_path

    (tmp_path / "folder" / "inner").mkdir(parents=True)
    (tmp_path / "folder" / "inner" / "a.bin").write_bytes(b"x")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "b.txt").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "kept", target_is_directory=True)
    for name in ("folder", "file.txt", "link"):
        remove_path(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (tmp_path / "kept" / "b.txt").read_text() == "kept"  # a link's target is not the run's


def test_swap_in_moves_a_whole_set_with_the_first_read_file_last(tmp_path, monkeypatch):
    directory, stage, parked = tmp_path / "out", tmp_path / "out" / ".pipeline.tmp", tmp_path / "out" / ".old.tmp"
    (directory / "unet").mkdir(parents=True)
    (directory / "unet" / "old.safetensors").write_text("old")
    (directory / "model_index.json").write_text("old index")
    (directory / "pipeline_old.py").write_text("old code")
    (directory / "checkpoint-2").mkdir()  # not part of the set: untouched
    (stage / "unet").mkdir(parents=True)
    (stage / "unet" / "new.safetensors").write_text("new")
    (stage / "model_index.json").write_text("new index")
    seen = []  # what a reader finds at each rename: never the new index beside the old weights, or the reverse
    rename, replace = Path.rename, Path.replace

    def look(self, target, move):
        index = directory / "model_index.json"
        seen.append(index.read_text() if index.exists() else None)
        return move(self, target)

    monkeypatch.setattr(Path, "rename", lambda self, target: look(self, target, rename))
    monkeypatch.setattr(Path, "replace", lambda self, target: look(self, target, replace))
    swap_in(stage, directory, "model_index.json", parked=parked, also_replaces=["pipeline_old.py"])
    monkeypatch.undo()
    assert set(seen) == {None}  # the old index went first; the new one came last
    assert (directory / "model_index.json").read_text() == "new index"
    assert sorted(os.listdir(directory)) == ["checkpoint-2", "model_index.json", "unet"]
    assert os.listdir(directory / "unet") == ["new.safetensors"]


def _renames(tree: ast.AST) -> list[int]:
    """Lines that rename a file: os.replace/os.rename/shutil.move, Path.rename, Path.replace (one argument; a str's
    replace takes two)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            module = owner.id if isinstance(owner, ast.Name) else None
            if (module, name) in {("os", "replace"), ("os", "rename"), ("shutil", "move")}:
                lines.append(node.lineno)
            elif module not in ("os", "shutil") and (name == "rename" or (name == "replace" and len(node.args) == 1)):
                lines.append(node.lineno)
    return lines


def test_atomic_py_is_the_only_module_that_renames_files():
    """One home: every write-then-rename of the library goes through hf_ddpm/atomic.py."""
    package = REPO / "hf_ddpm"
    found = {
        f"{path.relative_to(package)}:{line}"
        for path in package.rglob("*.py")
        if path.name != "atomic.py"
        for line in _renames(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert not found, f"renames outside hf_ddpm/atomic.py: {sorted(found)}"
    assert len(_renames(ast.parse((package / "atomic.py").read_text()))) >= 5  # the scan sees them


def test_an_export_that_fails_leaves_no_folder_and_a_whole_one_otherwise(tmp_path, monkeypatch):
    """hub.export_hub_folder writes `dest.tmp` and renames it: a failure midway leaves neither name behind."""
    pipe = HFDDPMPipeline(UNet2DModel(**unet_config("test-tiny")), HFDDPMScheduler(num_train_timesteps=10))
    assert hub.save_hub_pipeline(pipe, tmp_path / "run")
    assert not [name for name in os.listdir(tmp_path / "run") if is_staging(name)]  # the swap left none
    dest = tmp_path / "export"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(hub, "render_model_card", fail)
        with pytest.raises(OSError, match="No space left"):
            hub.export_hub_folder(tmp_path / "run", dest, repo_id="me/m")
    assert sorted(os.listdir(tmp_path)) == ["run"]
    dest.mkdir()  # new or empty: both take the export
    files = hub.export_hub_folder(tmp_path / "run", dest, repo_id="me/m")
    assert {"model_index.json", "README.md", "unet/config.json"} <= set(files)
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]
