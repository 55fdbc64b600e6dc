"""One run per output directory, and a directory that is ours or empty: the lock (a second run is refused naming
the first's PID; a SIGKILLed run's lock blocks nothing), foreign files (refused, untouched; kept with
--allow_nonempty_output_dir; never removed by --overwrite_output_dir), and refused resumes that change nothing."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from fault_hooks import start_training, stop, wait_for_marker
from hub_clients import tree_hashes
from training_runs import assert_same_weights, reset_accelerate, tiny

from hf_ddpm.training import checkpoints, parse_args, train
from hf_ddpm.training.checkpoints import RUN_RECORD
from hf_ddpm.training.main import main
from hf_ddpm.training.output_dir import LOCK_NAME, MANIFEST_NAME, OutputDirError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py
RUN = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-3"]


def test_a_second_run_is_refused_at_once_naming_the_first_and_the_first_finishes_untouched(tmp_path):
    reference = tmp_path / "reference"
    train(parse_args(tiny(reference, *RUN)))
    out = tmp_path / "out"
    first = start_training(tmp_path, tiny(out, *RUN), pause_at="first-step", FAULT_STEP_SLEEP="0.2")
    assert wait_for_marker(first), first.log.read_text()[-3000:]
    for extra in ([], ["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
        started = time.monotonic()
        with pytest.raises(OutputDirError, match=rf"{out} is in use by another training run: PID {first.pid} on host"):
            train(parse_args(tiny(out, *RUN, *extra)))
        assert time.monotonic() - started < 5
    assert first.wait(timeout=120) == 0, first.log.read_text()[-3000:]
    assert_same_weights(reference, out, ("unet/diffusion_pytorch_model.safetensors", "checkpoint-6/model.safetensors"))


def test_a_sigkilled_runs_lock_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "out"
    process = start_training(tmp_path, tiny(out, *RUN), pause_at="checkpoint-3")
    stop(process)  # SIGKILL while it holds the lock
    assert (out / LOCK_NAME).exists()
    summary = train(parse_args(tiny(out, *RUN, "--resume_from_checkpoint", "latest")))
    assert summary["optimizer_steps"] == 6


def test_a_run_killed_while_it_wrote_its_first_manifest_blocks_no_later_run(tmp_path):
    """Its directory holds the lock and the manifest's staging file alone: neither someone else's files nor a run to
    resume. A requeued `latest` starts the run afresh, as after a kill at any other moment."""
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{MANIFEST_NAME}.tmp").write_text('{"written_by": "hf_d')  # cut short by the kill
    (out / LOCK_NAME).write_text('{"pid": 999999')
    summary = train(parse_args(tiny(out, *RUN, "--resume_from_checkpoint", "latest")))
    assert summary["optimizer_steps"] == 6
    assert json.loads((out / MANIFEST_NAME).read_text())["foreign"] == []
    assert not (out / f"{MANIFEST_NAME}.tmp").exists()


def test_training_args_json_is_whole_or_as_it_was_when_its_write_fails(trained, monkeypatch):
    """A resume rewrites training_args.json (evaluate and `--config` read it): a write that fails midway (a kill, a
    full disk) leaves the earlier file whole, never a part of it."""
    before, real = (trained / "training_args.json").read_text(), json.dump

    def dump(values, f, **kwargs):
        if "learning_rate" not in values:  # the manifest, written before it
            return real(values, f, **kwargs)
        f.write('{"output_dir": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hf_ddpm.training.output_dir.json.dump", dump)
    with pytest.raises(OSError, match="No space left on device"):
        train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "checkpoint-3")))
    monkeypatch.undo()
    assert (trained / "training_args.json").read_text() == before
    assert not (trained / "training_args.json.tmp").exists()


def test_a_foreign_directory_is_refused_untouched_and_kept_with_the_flag(tmp_path):
    out = tmp_path / "photos"
    (out / "unet_notes").mkdir(parents=True)
    (out / "unet_notes" / "a.txt").write_text("mine")
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    before = tree_hashes(out)
    with pytest.raises(OutputDirError, match=r"photos is not empty and holds no earlier training run \(holiday.jpg, "
                                             r"unet_notes\); .*--allow_nonempty_output_dir"):  # fmt: skip
        train(parse_args(tiny(out)))
    assert tree_hashes(out) == before  # byte-identical, nothing added
    train(parse_args(tiny(out, "--allow_nonempty_output_dir", "--checkpointing_steps", "1")))
    after = tree_hashes(out)
    assert {k: after[k] for k in before} == before and (out / "model_index.json").exists()
    # --overwrite_output_dir starts over: only what a run of ours wrote goes
    train(parse_args(tiny(out, "--overwrite_output_dir", "--checkpointing_steps", "100")))
    assert {k: tree_hashes(out)[k] for k in before} == before and not list(out.glob("checkpoint-*"))


def test_a_foreign_file_with_a_name_we_write_is_refused_even_with_the_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"my own picture")
    with pytest.raises(OutputDirError, match="holds samples.png, which a training run writes"):
        train(parse_args(tiny(out, "--allow_nonempty_output_dir")))
    assert sorted(os.listdir(out)) == ["samples.png"]


@pytest.fixture
def trained(tmp_path) -> Path:
    out = tmp_path / "out"
    train(parse_args(tiny(out, *RUN)))
    return out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--resume_from_checkpoint", "checkpoint-99"], "'checkpoint-99': no such checkpoint directory"),
        (
            ["--resume_from_checkpoint", "latest", "--ddpm_num_steps", "40", "--ddpm_beta_schedule", "cosine"],
            r"was trained with another model or objective: --ddpm_beta_schedule: 'linear' in the checkpoint, "
            r"'squaredcos_cap_v2' now; --ddpm_num_steps: 50 in the checkpoint, 40 now. Resume with the options",
        ),
        (["--resume_from_checkpoint", "latest", "--model_config", "digits-16-tiny"], r"UNet block_out_channels: "),
        (["--resume_from_checkpoint", "latest", "--prediction_type", "v_prediction", "--loss", "simple"],
         r"--prediction_type: 'epsilon' in the checkpoint, 'v_prediction' now"),
        (["--resume_from_checkpoint", "latest", "--mixed_precision", "bf16"],
         r"--mixed_precision bf16: the checkpoint .*checkpoint-6 was trained with --mixed_precision no"),
    ],
)  # fmt: skip
def test_a_refused_resume_names_the_differences_and_changes_nothing(trained, extra, match, no_data):
    before = tree_hashes(trained)
    with pytest.raises(ValueError, match=match):
        train(parse_args(tiny(trained, *RUN, *extra)))
    assert tree_hashes(trained) == before


def test_a_checkpoint_without_a_run_record_is_refused_saying_why(trained, no_data):
    (trained / "checkpoint-6" / RUN_RECORD).unlink()
    before = tree_hashes(trained)
    with pytest.raises(ValueError, match=r"checkpoint-6 holds no run_record.json: it was written by an earlier "
                                         r"version of hf_ddpm.*start a new run \(--overwrite_output_dir\)"):  # fmt: skip
        train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))
    assert tree_hashes(trained) == before


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_a_checkpoint_overwritten_in_place_is_refused_before_anything_is_written(trained, name, capsys):
    """Bytes of a state file replaced at its recorded size pass the size check: loading finds them, before the
    output directory is touched (training_args.json, the manifest, the logs stay as they were), and the line names
    the damage and the newest whole checkpoint, not torch's advice for intact files."""
    damaged, whole = trained / "checkpoint-3", trained / "checkpoint-6"  # (resuming 6 would find the run complete)
    with open(damaged / name, "r+b") as f:
        f.write(bytes(range(256)) * 16)
    before = tree_hashes(trained)
    assert main(tiny(trained, *RUN, "--resume_from_checkpoint", str(damaged))) == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"error: the checkpoint {damaged} is damaged: its state does not load (")
    assert line.endswith(f"); resume the newest whole one, --resume_from_checkpoint {os.path.realpath(whole)}, or "
                         "start a new run")  # fmt: skip
    assert "weights_only" not in line
    unlocked = lambda hashes: {k: v for k, v in hashes.items() if k != LOCK_NAME}  # noqa: E731 (names its holder)
    assert unlocked(tree_hashes(trained)) == unlocked(before)


def test_the_summary_counts_the_time_of_every_resumed_part(trained):
    """A requeued job's card says how long the model trained, not how long its last part did: each checkpoint records
    the time trained up to its step, and a resume goes on from it."""
    records = {n: json.loads((trained / f"checkpoint-{n}" / RUN_RECORD).read_text()) for n in (3, 6)}
    summary = json.loads((trained / "training_summary.json").read_text())
    assert 0 < records[3]["seconds"] <= records[6]["seconds"] <= summary["train_seconds"]
    shutil.rmtree(trained / "checkpoint-6")  # resume from step 3: as if the run had been stopped there
    (trained / "training_summary.json").unlink()
    path = trained / "checkpoint-3" / RUN_RECORD
    path.write_text(json.dumps({**records[3], "seconds": 1000.0}))  # a first part that took 1000 s
    summary = train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))
    assert 1000.0 < summary["train_seconds"] < 1000.0 + 300
    assert (
        1000.0 < json.loads((trained / "checkpoint-6" / RUN_RECORD).read_text())["seconds"] <= summary["train_seconds"]
    )


def test_resuming_a_finished_run_says_it_is_complete_and_writes_nothing(trained, caplog, monkeypatch):
    """A requeued job of a finished run: not its final evaluation, pipeline and push again (at CIFAR-10 scale the
    held-out bound alone takes hours), nor its data opened (a node without the dataset in its cache would download
    it); the run's own summary is the result."""
    before = tree_hashes(trained)
    reset_accelerate()  # as in a fresh process: accelerate's state is made by the checks, before any log line
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr("hf_ddpm.training.main.load_training_data", lambda *a, **k: pytest.fail("the data was opened"))
        summary = train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))
    assert summary == json.loads((trained / "training_summary.json").read_text()) and summary["optimizer_steps"] == 6
    assert f"{trained} is complete at step 6 (its pipeline and training_summary.json are written)" in caplog.text
    assert "resumed from" not in caplog.text
    assert {k: v for k, v in tree_hashes(trained).items() if k != LOCK_NAME} == {
        k: v for k, v in before.items() if k != LOCK_NAME
    }
    # without its summary (a run stopped in its final evaluation), the resume evaluates and saves: not complete
    (trained / "training_summary.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))["optimizer_steps"] == 6
    assert "is complete" not in caplog.text and (trained / "training_summary.json").is_file()


@pytest.mark.parametrize("checkpointing", ["4", "100"])  # its last checkpoint at step 4 of 6; none at all
def test_a_finished_run_without_a_checkpoint_of_its_last_step_is_complete_to_latest(tmp_path, caplog, checkpointing):
    """A requeue of a run whose last step is no multiple of --checkpointing_steps (or that kept no checkpoint): its
    summary says it finished, so nothing is trained again (nor evaluated, saved, pushed). Without a checkpoint, a
    run of another length would start afresh over the finished pipeline: refused, the directory untouched."""
    out = tmp_path / "out"
    run = ["--max_train_steps", "6", "--checkpointing_steps", checkpointing, "--learning_rate", "1e-3"]
    train(parse_args(tiny(out, *run)))
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == ([4] if checkpointing == "4" else [])
    before = {k: v for k, v in tree_hashes(out).items() if k != LOCK_NAME}
    reset_accelerate()
    with caplog.at_level(logging.INFO):
        summary = train(parse_args(tiny(out, *run, "--resume_from_checkpoint", "latest")))
    assert summary["optimizer_steps"] == 6 and f"{out} is complete at step 6 (its pipeline" in caplog.text
    assert "resumed from" not in caplog.text and "starting a new run" not in caplog.text
    assert {k: v for k, v in tree_hashes(out).items() if k != LOCK_NAME} == before
    if checkpointing == "100":
        assert "it kept no checkpoint: to train again, start over with --overwrite_output_dir" in caplog.text
        reset_accelerate()
        longer = tiny(out, *run, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
        with pytest.raises(ValueError, match=rf"{out} holds the pipeline of a run finished at step 6 and no checkpoint "
                                             "to resume it from: a run of 8 steps here would start afresh and replace"):  # fmt: skip
            train(parse_args(longer))
        assert {k: v for k, v in tree_hashes(out).items() if k != LOCK_NAME} == before


def test_resuming_an_older_checkpoint_says_the_newer_ones_are_replaced(trained, caplog):
    """Resuming from before a divergence is deliberate, so it goes on; but the newer checkpoints of the same steps
    are replaced by this run's, and that is said before anything is written (as in a fresh process: before
    accelerate's state exists, which its logger needs)."""
    reset_accelerate()
    with caplog.at_level(logging.WARNING):
        train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "checkpoint-3")))
    assert (
        f"resuming {trained / 'checkpoint-3'}, older than checkpoint-6: this run's checkpoints of the same steps "
        "replace those" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))
    assert "older than" not in caplog.text


def test_a_folder_that_is_not_a_checkpoint_is_refused_as_such(trained, no_data, tmp_path):
    """Not the advice for an earlier version's checkpoint (start over with --overwrite_output_dir): that would
    delete the run whose checkpoints sit beside it."""
    elsewhere = tmp_path / "notes"
    elsewhere.mkdir()
    (elsewhere / "readme.txt").write_text("not a checkpoint")
    before = tree_hashes(trained)
    for folder in (elsewhere, trained / "unet"):
        with pytest.raises(ValueError) as refused:
            train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", str(folder))))
        assert str(refused.value) == (
            f"--resume_from_checkpoint {folder} is not a checkpoint (it holds no run_record.json and no saved training "
            "state): name a checkpoint-<step> folder that a run wrote, or 'latest'"
        )
    assert tree_hashes(trained) == before


@pytest.mark.parametrize("damage", ["delete optimizer.bin", "truncate model.safetensors"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_newest_whole_one(trained, damage, no_data, capsys):
    """A file deleted or truncated since the checkpoint was written (its run record lists each with its size) is
    refused before anything is loaded or written: training_args.json, the manifest, the logs stay as they were."""
    newest, older = trained / "checkpoint-6", trained / "checkpoint-3"
    if damage == "delete optimizer.bin":
        (newest / "optimizer.bin").unlink()
        said = "optimizer.bin is missing"
    else:
        weights = newest / "model.safetensors"
        size = weights.stat().st_size
        os.truncate(weights, size // 2)
        said = f"model.safetensors holds {size // 2} bytes, not the {size} written"
    before = tree_hashes(trained)
    assert main(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the checkpoint {newest} is damaged: {said}; resume the newest whole one, --resume_from_checkpoint "
        f"{os.path.realpath(older)}, or start a new run"
    )
    assert tree_hashes(trained) == before
    (older / "scheduler.bin").unlink()  # the other one damaged too: none to suggest
    assert main(tiny(trained, *RUN, "--resume_from_checkpoint", str(older))) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the checkpoint {older} is damaged: scheduler.bin is missing; none is whole: start a new run"
    )


def test_training_args_json_resumes_its_run_from_any_working_directory(tmp_path, monkeypatch):
    """README's way out, `--config <out>/training_args.json --resume_from_checkpoint latest`, typed in another
    directory resumes that run: the file holds the paths absolute, not as typed (a new run would start there)."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(here)
    train(parse_args(tiny("out", *RUN, "--cache_dir", "cache", "--model_config", "test-tiny")))
    args = json.loads((here / "out" / "training_args.json").read_text())
    assert (args["output_dir"], args["cache_dir"]) == (str(here / "out"), str(here / "cache"))
    assert (args["model_config"], args["dataset_name"], args["logging_dir"]) == ("test-tiny", None, "logs")  # kept
    (here / "out" / "checkpoint-6").rename(here / "out" / "checkpoint-6.old")  # the run stopped after step 3 ...
    (here / "out" / "training_summary.json").unlink()  # ... so it never finished
    monkeypatch.chdir(elsewhere)
    summary = train(parse_args(["--config", str(here / "out" / "training_args.json"), "--resume_from_checkpoint",
                                "latest"]))  # fmt: skip
    assert summary["optimizer_steps"] == 6 and (here / "out" / "checkpoint-6").is_dir()
    assert os.listdir(elsewhere) == []


def test_a_resume_restores_the_checkpoints_mixed_precision(tmp_path):
    out = tmp_path / "out"
    train(parse_args(tiny(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--mixed_precision", "bf16")))
    (out / "checkpoint-2").rename(out / "checkpoint-2.old")  # resume from step 1
    summary = train(parse_args(tiny(out, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1")))
    assert summary["mixed_precision"] == "bf16"  # restored, not the launcher's default "no"


def test_the_manifest_records_the_foreign_files_and_the_lock_its_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    train(parse_args(tiny(out, "--allow_nonempty_output_dir")))
    assert json.loads((out / MANIFEST_NAME).read_text())["foreign"] == ["notes.txt"]
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    assert checkpoints.list_checkpoints(out) == []


def test_a_resume_with_another_process_count_is_refused(trained):
    """The data order and random streams follow from the process count: a checkpoint of 2 processes resumed by 1
    is refused before anything is read or written (the record is what checkpoint-6 holds, its count changed)."""
    path = trained / "checkpoint-6" / RUN_RECORD
    record = json.loads(path.read_text())
    assert (record["launch"]["num_processes"], record["launch"]["mixed_precision"], record["step"]) == (1, "no", 6)
    record["launch"]["num_processes"] = 2
    path.write_text(json.dumps(record))
    before = tree_hashes(trained)
    match = (
        r"checkpoint-6 was written by 2 processes and this run has 1 \(the data order and random streams depend on "
        r"it\): checkpoint-3 fits this 1-process run: .*; or resume checkpoint-6 with "
        r"`(ACCELERATE_USE_CPU=1 )?accelerate launch --multi_gpu --num_processes 2 --mixed_precision no .* "
        r"--resume_from_checkpoint \S+/checkpoint-6`"
    )
    with pytest.raises(ValueError, match=match):
        train(parse_args(tiny(trained, *RUN, "--resume_from_checkpoint", "latest")))
    assert tree_hashes(trained) == before
