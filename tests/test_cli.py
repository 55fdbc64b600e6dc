"""The `python -m hf_ddpm` command line at the door, run as a newcomer runs it: a mistyped flag, subcommand or choice
answered with one line naming the nearest and a one-line usage; both spellings of every flag; a model argument
that names a missing folder, a Hub that cannot be reached, or a repo the Hub does not have, each named in seconds."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_clients import finish, start_script

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.cli import build_parser, main
from hf_ddpm.flags import FlagParser, canonical
from hf_ddpm.loading import check_pipeline_index

REPO = Path(__file__).resolve().parents[1]
# In this process an answer takes one request (at most its 5 s timeout): 15 s is generous. A new process adds the
# interpreter's start-up and imports (seconds; a minute on a busy machine), so its bound is a sanity bound only, and
# its output is checked for huggingface_hub's retry lines instead (the retries replaced took 70-80 s).
SECONDS, PROCESS_SECONDS = 15, 150


def hf_ddpm(*argv, env: dict | None = None, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m hf_ddpm ARGV`, and how long it took."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hf_ddpm", *map(str, argv)],
        env=environment, cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.fixture
def closed_port():
    """A local port that nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A local port that accepts connections and never answers (a Hub behind a dead proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline):
    return tiny_pipeline(10)


# ------------------------------------------------------------------------------------------------ flags


def parse_error(argv: list[str], capsys) -> list[str]:
    """The lines `python -m hf_ddpm ARGV` prints when its parser refuses ARGV (exit status 2)."""
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_an_unknown_flag_is_one_line_naming_the_nearest_then_a_one_line_usage(capsys):
    result, _ = hf_ddpm("evaluate", "outputs/run", "--num_imgs", "8")  # the real command line
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m hf_ddpm evaluate: error: unrecognized flag --num_imgs (did you mean --num_images?)",
        "usage: python -m hf_ddpm evaluate [options] model   (--help describes every flag)",
    ]
    first, usage = parse_error(["push", "out", "--repo_id", "me/m", "--privte", "--tokn=x"], capsys)
    assert first.endswith("unrecognized flags --privte (did you mean --private?), --tokn (did you mean --token?)")
    assert usage.startswith("usage: python -m hf_ddpm push [options] --repo_id REPO_ID output_dir")
    lines = parse_error(["evaluate", "m", "--zzzzzz"], capsys)  # nothing near: named, no guess
    assert lines[0] == "python -m hf_ddpm evaluate: error: unrecognized flag --zzzzzz"


def test_a_mistyped_subcommand_or_choice_and_a_missing_flag_name_what_is_wanted(capsys):
    lines = parse_error(["evalute", "outputs/run"], capsys)
    assert len(lines) == 2 and lines[0].endswith("did you mean 'evaluate'?")
    lines = parse_error(["evaluate", "m", "--protocol", "pape"], capsys)
    assert "invalid choice: 'pape'" in lines[0] and lines[0].endswith("did you mean 'paper'?")
    parser = FlagParser(prog="x")  # later Pythons write the choices unquoted: the nearest is found all the same
    with pytest.raises(SystemExit):
        parser.error("argument --a: invalid choice: 'cosinus' (choose from linear, scaled_linear, cosine)")
    assert capsys.readouterr().err.splitlines()[0].endswith("(choose from linear, scaled_linear, cosine); did you mean 'cosine'?")  # fmt: skip
    assert parse_error(["push", "out"], capsys) == [
        "python -m hf_ddpm push: error: the following arguments are required: --repo_id",
        "usage: python -m hf_ddpm push [options] --repo_id REPO_ID output_dir   (--help describes every flag)",
    ]


def test_evaluate_and_training_read_each_others_names_for_the_held_out_bound_and_help_shows_defaults():
    from hf_ddpm.training import parse_args

    evaluate = build_parser().parse_args(["evaluate", "m", "--eval_num_images", "8", "--eval_num_timesteps", "4"])
    assert (evaluate.num_images, evaluate.num_timesteps) == (8, 4)  # training's names, in evaluate
    training = parse_args(["--num_images", "8", "--num_timesteps", "4"])
    assert (training.eval_num_images, training.eval_num_timesteps) == (8, 4)  # evaluate's names, in training
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    text = " ".join(commands["evaluate"].format_help().split())
    assert "--split {eval,train} eval: the test/held-out split (default: eval)" in text  # a default is shown
    assert "--likelihood_dir LIKELIHOOD_DIR" in text and "(default: None)" not in text  # a None one is not


def long_flags(parser) -> dict[str, list[str]]:
    """{subcommand: its long flags as declared}."""
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return {name: [s for a in sub._actions for s in a.option_strings if s.startswith("--")] for name, sub in commands.items()}  # fmt: skip


def test_every_subcommand_spells_its_flags_with_underscores_and_reads_the_dash_spelling_too(pipeline_dir):
    parser = build_parser()
    for command, flags in long_flags(parser).items():
        for flag in flags:
            assert "-" not in flag[2:] or flag == "--help", f"{command} {flag}: one style, underscores"
    for sub in parser._subparsers._group_actions[0].choices.values():  # and each --help says so
        assert FlagParser.SPELLING in " ".join(sub.format_help().split())
    required = {"push": ["out"], "export": ["out", "dest"], "evaluate": ["m"], "push-space": []}
    for command, flags in long_flags(parser).items():
        for flag in (f for f in flags if "_" in f):
            action = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions if flag in a.option_strings)  # fmt: skip
            value = [] if action.nargs == 0 else [str(action.choices[0]) if action.choices else "1"]
            given = {"--repo_id": ["me/m"], "--space_id": ["me/s"], "--model_id": ["me/m"]}
            rest = [a for f, v in given.items() if f in flags and f != flag for a in (f, *v)]
            underscored = parser.parse_args([command, *required[command], flag, *value, *rest])
            dashed = parser.parse_args([command, *required[command], "--" + canonical(flag).replace("_", "-"), *value, *rest])  # fmt: skip
            assert underscored == dashed, (command, flag)
    # the old spelling through the real command line and the new one export the same folder
    result, _ = hf_ddpm("export", pipeline_dir, pipeline_dir.parent / "--repo-id", "--repo-id", "me/digits")
    assert result.returncode == 0, result.stderr
    assert main(["export", str(pipeline_dir), str(pipeline_dir.parent / "--repo_id"), "--repo_id", "me/digits"]) == 0
    old, new = (sorted((p.relative_to(d), p.read_bytes()) for p in d.rglob("*") if p.is_file())
                for d in (pipeline_dir.parent / "--repo-id", pipeline_dir.parent / "--repo_id"))  # fmt: skip
    assert old == new and any(str(name) == "README.md" for name, _ in new)


# ------------------------------------------------------------------------------------------------ the model argument


def test_a_missing_local_folder_is_named_at_once(tmp_path, closed_port, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # never asked: these are not repo ids
    for path in ("./outputs/run", str(tmp_path / "outputs" / "run"), "outputs/run/"):
        if path == "./outputs/run":  # the real command line, timed
            result, seconds = hf_ddpm("evaluate", path)
            code, err = result.returncode, result.stderr
            assert seconds < PROCESS_SECONDS, (seconds, err)
        else:
            started = time.monotonic()
            code, err = main(["evaluate", path]), capsys.readouterr().err
            assert time.monotonic() - started < SECONDS
        assert code == 1 and err.strip() == (
            f"error: {path}: no such directory (and not a Hub repo id, which is NAME or NAMESPACE/NAME). Pass a "
            "pipeline directory (a training --output_dir, or one save_pretrained wrote) or a Hub repo id"
        ), err
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "weights.safetensors")]) == 1
    assert "weights.safetensors is a file: load a pipeline directory" in capsys.readouterr().err


def test_an_unreachable_hub_is_named_in_seconds(tmp_path, pipeline_dir, closed_port, silent_port, monkeypatch, capsys):
    """`outputs/run` (a folder that does not exist here, and a valid repo id) with the Hub refusing connections;
    then the library call with a Hub that accepts and never answers: one request, a 5 s timeout, no retries."""
    result, seconds = hf_ddpm("evaluate", "outputs/run", env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"})
    assert result.returncode == 1 and seconds < PROCESS_SECONDS, (seconds, result.stderr)
    assert result.stderr.startswith(
        f"error: outputs/run is not a local directory, and the Hugging Face Hub at http://127.0.0.1:{closed_port} "
        "cannot be reached ("
    ), result.stderr
    assert "to look for a Hub repo of that name (none is in the local cache)" in result.stderr
    assert len(result.stderr.splitlines()) == 1  # no retry messages
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")  # read when the probe asks
    started = time.monotonic()  # a local model with a Hub dataset: the data is probed as training probes it
    assert main(["evaluate", str(pipeline_dir), "--dataset_name", "someone/images"]) == 1
    assert time.monotonic() - started < SECONDS
    assert capsys.readouterr().err.startswith(
        f"error: --dataset_name someone/images: the Hugging Face Hub at http://127.0.0.1:{closed_port} cannot be "
        "reached ("
    )
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_port}")
    started = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        HFDDPMPipeline.from_pretrained("google/ddpm-cifar10-32", cache_dir=tmp_path)
    assert time.monotonic() - started < SECONDS
    assert str(error.value) == (
        "google/ddpm-cifar10-32 is not a local directory, and the Hugging Face Hub at "
        f"http://127.0.0.1:{silent_port} cannot be reached (no answer within 5 s) to look for a Hub repo of that name "
        "(none is in the local cache). Check the path; or the network (HF_ENDPOINT, a proxy); for a repo downloaded "
        "before, pass its cache_dir or set HF_HOME"
    )


def test_the_check_at_trainings_door_finds_the_missing_model_too(closed_port, monkeypatch):
    """training's --pretrained_model_name_or_path is checked with check_pipeline_index before anything is read."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(FileNotFoundError, match=r"^\./outputs/missing: no such directory"):
        check_pipeline_index("./outputs/missing")
    with pytest.raises(ConnectionError, match=r"^me/missing is not a local directory, and the Hugging Face Hub at "):
        check_pipeline_index("me/missing")


def test_a_repo_the_hub_lacks_is_named_and_a_cached_one_loads_when_the_hub_is_gone(
    tmp_path, pipeline_dir, hub, closed_port, monkeypatch, capsys
):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    started = time.monotonic()
    assert main(["evaluate", "test-user/no-such-model"]) == 1
    assert time.monotonic() - started < SECONDS
    assert capsys.readouterr().err.strip() == (
        f"error: test-user/no-such-model is not a local directory, and the Hub at {hub.url} has no model repo named "
        "test-user/no-such-model (HTTP 404; a private or gated repo needs a token: `hf auth login` or token=). Pass "
        "a pipeline directory (a training --output_dir, or one save_pretrained wrote) or a Hub repo id"
    )
    env = hub.env(tmp_path, "hf_x") | {"PYTHONPATH": str(REPO)}
    script = f"""
        import os, sys, warnings
        from huggingface_hub import create_repo, upload_folder
        from hf_ddpm import HFDDPMPipeline
        if sys.argv[1] == "upload":
            repo = create_repo("test-user/cached", token="hf_x").repo_id
            upload_folder(repo_id=repo, folder_path={str(pipeline_dir)!r}, token="hf_x")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = HFDDPMPipeline.from_pretrained("test-user/cached")
        print(pipe.scheduler.config.num_train_timesteps, [str(w.message) for w in caught if "cache" in str(w.message)])
        if sys.argv[1] == "load":  # and offline mode, set now: nothing is asked, the cache is read
            os.environ["HF_HUB_OFFLINE"] = "1"
            print("offline:", HFDDPMPipeline.from_pretrained("test-user/cached").scheduler.config.num_train_timesteps)
    """
    assert finish(start_script(sys.executable, script, env, tmp_path, "upload")).startswith("10 []")
    process = start_script(sys.executable, script, env | {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}, tmp_path,
                           "load")  # fmt: skip
    out, err = (text.decode() for text in process.communicate(timeout=PROCESS_SECONDS))
    assert process.returncode == 0 and "Retry" not in err, err
    assert (
        out.startswith("10 [") and "cannot be reached" in out and "loading test-user/cached from the local cache" in out
    )
    assert out.splitlines()[-1] == "offline: 10"


def test_offline_mode_names_a_repo_that_is_not_in_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "outputs/run"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: outputs/run is not a local directory, and no Hub repo of that name is in the local cache, the only "
        "place offline mode (HF_HUB_OFFLINE=1) looks. Check the path, or download the repo once with the network on"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match="the only place local_files_only=True looks"):
        HFDDPMPipeline.from_pretrained("google/ddpm-cifar10-32", local_files_only=True, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ progress


@pytest.mark.slow  # the real Inception-v3 (about 10 s to load and run on 14 images here)
def test_evaluate_shows_count_and_eta_of_every_phase(pipeline_dir, tmp_path):
    result, _ = hf_ddpm(
        "evaluate", pipeline_dir, "--num_images", 2, "--num_samples", 6, "--reference_count", 8, "--batch_size", 3,
        "--reference_cache_dir", tmp_path / "reference", "--sample_dir", tmp_path / "samples",
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # tqdm's closing state of each bar: "<phase>: 100%|████| done/total [elapsed<remaining, rate]"
    bars = dict(re.findall(r"([a-z/ ]+): 100%\|[^|]*\| (\d+/\d+) \[\d+:\d+<\d+:\d+", result.stderr))
    phases = {"bits/dim": "2/2", "reference statistics": "8/8", "sampling": "2/2", "sample features": "6/6"}
    assert {k.strip(): v for k, v in bars.items() if k.strip() in phases} == phases, result.stderr[-3000:]
    assert re.search(r"\| \d+/10 \[", result.stderr)  # within a shard: its 10 sampling steps (a bar that closes)
