"""The run config (hf_ddpm/training/config.py) and its command line (hf_ddpm/training/cli.py): the parser is built
from the fields, a config is frozen and checked whenever it is built, `resolve` fills the run-dependent values into a
new one, `--config FILE` with overrides."""

import dataclasses
import json
import types
import typing

import pytest

from hf_ddpm import HFDDPMScheduler
from hf_ddpm.flags import canonical
from hf_ddpm.training import build_parser
from hf_ddpm.training.cli import config_values, parse_args, read_config_file
from hf_ddpm.training.config import GROUPS, TrainingConfig, check_args, flag_of_key
from hf_ddpm.training.main import main
from hf_ddpm.training.resolve import RunFacts, optimizer_steps, resolve

EARLIER_FLAGS = set(
    "--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --allow_tf32 --beta_schedule --cache_dir "
    "--center_crop --channels_last --checkpointing_steps --checkpoints_total_limit --compile --dataset_config_name "
    "--dataset_name --ddpm_beta_schedule --ddpm_num_inference_steps --ddpm_num_steps --ema_inv_gamma --ema_max_decay "
    "--ema_power --eval_batch_size --eval_bits_per_dim_steps --eval_num_images --eval_num_timesteps --eval_size "
    "--gradient_accumulation_steps --hub_model_id --hub_private_repo --hub_token --image_column --importance_sampling "
    "--learning_rate --logger --logging_dir --loss --lr_scheduler --lr_warmup_steps --max_grad_norm "
    "--max_train_samples --max_train_steps --mixed_precision --model_config --model_config_name_or_path --no-use_ema "
    "--num_epochs --num_train_timesteps --on_corrupt_image --on_nan --output_dir --overwrite_output_dir "
    "--prediction_type --pretrained_model_name_or_path --push_to_hub --random_crop --random_flip --resolution "
    "--resume_from_checkpoint --save_images_epochs --save_images_steps --save_model_epochs --save_model_steps --seed "
    "--train_batch_size --train_data_dir --use_ema --variance_type".split()
)


def _actions():
    return {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "config")}


def test_every_field_is_a_flag_of_its_group_and_nothing_else_is():
    parser = build_parser()
    actions = _actions()
    assert set(actions) == {f.name for f in dataclasses.fields(TrainingConfig)}
    for title, options in GROUPS:
        (group,) = [g for g in parser._action_groups if g.title == title]
        assert {a.dest for a in group._group_actions} == {f.name for f in dataclasses.fields(options)}
    flags = {s for a in parser._actions for s in a.option_strings}
    assert EARLIER_FLAGS <= flags  # every flag of the hand-written argparse namespace it replaced, names unchanged


def test_choices_types_and_defaults_come_from_the_fields():
    actions = _actions()
    hints = typing.get_type_hints(TrainingConfig)
    assert actions["loss"].choices == ("simple", "vlb", "hybrid")
    assert actions["prediction_type"].choices == ("epsilon", "sample", "v_prediction")
    assert (
        "cosine" in actions["ddpm_beta_schedule"].choices
        and "squaredcos_cap_v2" in actions["ddpm_beta_schedule"].choices
    )
    for name, action in actions.items():
        hint = hints[name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        literal = [a for a in members if typing.get_origin(a) is typing.Literal]
        assert action.choices == (typing.get_args(literal[0]) if literal else None), name
        assert action.default == TrainingConfig.__dataclass_fields__[name].default, name
    assert actions["train_batch_size"].type is int and actions["learning_rate"].type is float
    assert actions["eval_size"].type("0.25") == 0.25 and actions["eval_size"].type("7") == 7
    # diffusers' names as aliases
    assert parse_args(["--num_train_timesteps", "40", "--beta_schedule", "cosine"]).ddpm_num_steps == 40


def test_the_defaults_are_a_config_built_without_arguments():
    assert parse_args([]) == TrainingConfig()
    config = resolve(TrainingConfig(), RunFacts())[0]  # what a new run without flags trains with
    assert (config.learning_rate, config.adam_beta1, config.adam_beta2, config.ema_max_decay) == (
        2e-3,
        0.95,
        0.999,
        0.9999,
    )


def test_a_config_is_frozen_and_resolving_it_gives_a_new_one():
    given = parse_args(["--loss", "hybrid"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.loss = "simple"
    assert given.variance_type is None  # what was given: the run-dependent values are left to `resolve`
    check_args(given)
    resolved, notes = resolve(given, RunFacts())
    assert resolved.variance_type == "learned_range" and given.variance_type is None  # hybrid's only variance
    assert (resolved.ddpm_num_steps, resolved.ddpm_beta_schedule, resolved.prediction_type) == (
        1000,
        "linear",
        "epsilon",
    )
    assert (resolved.ddpm_num_inference_steps, resolved.save_images_epochs, resolved.mixed_precision) == (250, 10, "no")
    assert resolved.train_batch_size is None and resolved.lr_warmup_steps is None and notes == []  # no data facts yet
    assert resolve(resolved, RunFacts())[0] == resolved  # a resolved config resolves to itself
    with pytest.raises(ValueError, match="--loss hybrid needs variance_type learned_range"):
        dataclasses.replace(resolved, variance_type="fixed_small")  # a config built from another is checked too


def test_resolve_fits_the_defaults_to_the_data_and_the_run():
    given = parse_args(["--num_epochs", "6", "--ddpm_num_steps", "21"])
    config, notes = resolve(given, RunFacts(num_processes=1, train_images=9))
    assert (config.train_batch_size, config.lr_warmup_steps, config.ddpm_num_inference_steps) == (9, 0, 21)
    assert notes == [
        "--train_batch_size 9 (the default 64, capped: 9 training images over 1 processes)",
        "--lr_warmup_steps 0 (the default 100 is longer than the run's 6 steps: a tenth of it)",
    ]
    config, notes = resolve(given, RunFacts(num_processes=2, train_images=20_000))
    assert (config.train_batch_size, config.lr_warmup_steps, notes) == (64, 100, [])  # 156 steps per epoch
    with pytest.raises(ValueError, match="--lr_warmup_steps 100 exceeds the run's 6 optimizer steps"):
        resolve(parse_args(["--num_epochs", "6", "--lr_warmup_steps", "100"]), RunFacts(train_images=9))
    with pytest.raises(ValueError, match="--ddpm_num_inference_steps 250 exceeds the 21 training timesteps"):
        resolve(parse_args(["--ddpm_num_inference_steps", "250"]), RunFacts(pretrained_scheduler=PRETRAINED))


PRETRAINED = {"num_train_timesteps": 21, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
              "variance_type": "fixed_large"}  # fmt: skip


def test_the_resolved_config_names_its_spacing_and_resolution():
    """training_args.json holds every default filled in: the respaced chain's spacing (the pretrained scheduler's,
    else HFDDPMScheduler's) and the images' side (the UNet's sample_size unless --resolution says otherwise)."""
    config = resolve(parse_args([]), RunFacts(model_resolution=16))[0]
    assert (config.timestep_spacing, config.resolution) == (HFDDPMScheduler().config.timestep_spacing, 16)
    assert config.timestep_spacing == "leading"
    flags = parse_args(["--resolution", "8", "--timestep_spacing", "trailing"])
    given = resolve(flags, RunFacts(model_resolution=16))[0]
    assert (given.timestep_spacing, given.resolution) == ("trailing", 8)
    pretrained = RunFacts(pretrained_scheduler=PRETRAINED | {"timestep_spacing": "linspace"})
    assert resolve(parse_args(["--pretrained_model_name_or_path", "run"]), pretrained)[0].timestep_spacing == "linspace"
    assert resolve(config, RunFacts(model_resolution=16))[0] == config  # resolved once: it resolves to itself


def test_fine_tuning_resolves_to_the_pretrained_schedulers_objective():
    given = parse_args(["--pretrained_model_name_or_path", "run", "--beta_schedule", "cosine"])
    config, _ = resolve(given, RunFacts(pretrained_scheduler=PRETRAINED))
    assert (config.ddpm_num_steps, config.prediction_type, config.variance_type) == (21, "v_prediction", "fixed_large")
    assert config.ddpm_num_inference_steps == 21 and config.ddpm_beta_schedule == "cosine"  # the same schedule
    with pytest.raises(ValueError, match=r"keeps the pretrained scheduler's prediction_type='v_prediction'; "
                                         r"--prediction_type epsilon differs \(drop it, from the flags or the "
                                         r"--config file; or train from scratch\)"):  # fmt: skip
        resolve(dataclasses.replace(given, prediction_type="epsilon"), RunFacts(pretrained_scheduler=PRETRAINED))
    with pytest.raises(
        ValueError, match="--loss hybrid needs variance_type learned_range; the scheduler has .fixed_large."
    ):
        resolve(dataclasses.replace(given, loss="hybrid"), RunFacts(pretrained_scheduler=PRETRAINED))


def test_a_resumed_run_takes_its_checkpoints_precision_and_refuses_another(monkeypatch):
    facts = RunFacts(launch_precision="no", resume_path="out/checkpoint-4", resumed_precision="bf16")
    config, notes = resolve(parse_args([]), facts)
    assert config.mixed_precision == "bf16"
    assert notes == ["--mixed_precision bf16 restored from out/checkpoint-4 (the launch said no)"]
    with pytest.raises(ValueError, match=r"--mixed_precision no: the checkpoint out/checkpoint-4 was trained with "
                                         r"--mixed_precision bf16; drop the flag"):  # fmt: skip
        resolve(parse_args(["--mixed_precision", "no"]), facts)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match=r"the checkpoint out/checkpoint-4 was trained with --mixed_precision fp16, "
                                         r"which needs a CUDA GPU, and none is available"):  # fmt: skip
        resolve(parse_args([]), dataclasses.replace(facts, resumed_precision="fp16"))


def test_flags_of_scheduler_keys_come_from_the_fields():
    assert flag_of_key("num_train_timesteps") == "--ddpm_num_steps"
    assert flag_of_key("beta_schedule") == "--ddpm_beta_schedule"
    assert flag_of_key("prediction_type") == "--prediction_type" and flag_of_key("loss") == "--loss"
    assert flag_of_key("beta_start") is None  # set by the schedule, not by a flag
    evaluate_names = parse_args(["--num_images", "8", "--num_timesteps", "4", "--output-dir", "x"])
    assert (evaluate_names.eval_num_images, evaluate_names.eval_num_timesteps) == (8, 4)  # `evaluate`'s names
    assert evaluate_names.output_dir == "x"  # the dash spelling of any flag


def test_lower_bounds_are_field_metadata_and_name_the_flag():
    bounded = {f.name: f.metadata["min"] for f in dataclasses.fields(TrainingConfig) if f.metadata["min"] is not None}
    assert bounded["train_batch_size"] == 1 and bounded["learning_rate"] == 0 and bounded["resolution"] == 1
    for name, least in bounded.items():
        kind = type(TrainingConfig.__dataclass_fields__[name].default or least)
        with pytest.raises(ValueError, match=f"--{name} must be >= {least}, got {kind(least - 1)}"):
            TrainingConfig(**{name: kind(least - 1)})


def test_training_args_json_keeps_its_format_and_reads_back_as_a_config(tmp_path):
    config = parse_args(["--loss", "hybrid", "--random_crop", "--eval_size", "5", "--push_to_hub", "--hub_token", "t"])
    values = config.to_json()
    assert list(values) == [f.name for f in dataclasses.fields(config) if f.name != "hub_token"]
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(values, indent=2))
    again = parse_args(["--config", str(path), "--hub_token", "t"])
    assert again == config


# ---------------------------------------------------------------- --config FILE


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_are_used_and_the_command_line_wins(tmp_path, suffix):
    values = {"learning_rate": 2e-4, "train_batch_size": 128, "random_flip": True, "beta_schedule": "cosine"}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:  # YAML reads 2e-4 (no dot) as a string: typed like the command line
        path.write_text("learning_rate: 2e-4\ntrain_batch_size: 128\nrandom_flip: true\nbeta_schedule: cosine\n")
    config = parse_args(["--config", str(path)])
    assert (config.learning_rate, config.train_batch_size, config.random_flip) == (2e-4, 128, True)
    assert config.ddpm_beta_schedule == "cosine" and resolve(config, RunFacts())[0].adam_beta1 == 0.95  # defaults
    config = parse_args(["--train_batch_size", "8", "--config", str(path), "--no-random_flip"])
    assert (config.train_batch_size, config.random_flip, config.learning_rate) == (8, False, 2e-4)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "learning_rte: 1e-4\n",
            r"unknown option 'learning_rte' \(did you mean learning_rate\?\); allowed: dataset_name, .*, learning_rate, ",
        ),
        ("train_batch_size: 2.5\n", "train_batch_size must be int, got 2.5"),
        ("train_batch_size: many\n", "train_batch_size 'many' is not int"),
        ("random_flip: 1\n", "random_flip must be bool, got 1"),
        ("loss: l2\n", "loss 'l2' is not one of simple, vlb, hybrid"),
        ("max_grad_norm: null\n", "max_grad_norm cannot be null"),  # a run-dependent one (adam_beta1) may be
        ("- 1\n- 2\n", "must hold a mapping of option: value, got list"),
        ("a: [1\n", "is not valid YAML"),
        ("train_batch_size: 0\n", "--train_batch_size must be >= 1, got 0"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_key_and_what_is_allowed(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "suffix, text, where",
    [
        (".yaml", "learning_rate: 2e-4\ntrain_batch_size: 8\nlearning_rate: 1e-4\n", " (lines 1 and 3)"),
        (".json", '{"learning_rate": 2e-4, "train_batch_size": 8, "learning_rate": 1e-4}', ""),
    ],
)
def test_a_config_file_giving_one_key_twice_is_one_line_naming_the_file_and_key(tmp_path, capsys, suffix, text, where):
    """YAML and JSON parsers keep a repeated key's last value silently: a line appended to a file would change the
    run unseen. The file is refused in one line naming it, the key and (YAML) both lines."""
    path, out = tmp_path / f"run{suffix}", tmp_path / "out"
    path.write_text(text)
    assert main(["--config", str(path), "--output_dir", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: --config {path} gives 'learning_rate' twice{where}: keep one"
    ]
    assert not out.exists()
    path.write_text(
        text.replace("learning_rate: 1e-4", "lr_warmup_steps: 3").replace(
            '"learning_rate": 1e-4', '"lr_warmup_steps": 3'
        )
    )
    assert parse_args(["--config", str(path)]).learning_rate == 2e-4  # each key once: read as before


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_quoted_booleans_in_a_config_file_read_as_their_words(tmp_path, suffix):
    """bool("no") is True: a quoted "no" or "false" (YAML, JSON) must read as False, as argparse-style parsers do."""
    words = {"use_ema": "no", "random_flip": "false", "push_to_hub": "0", "allow_tf32": "Off", "channels_last": "YES",
             "compile": "True", "center_crop": "1", "debug": "on"}  # fmt: skip
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(words) if suffix == ".json" else "".join(f'{k}: "{v}"\n' for k, v in words.items()))
    config = parse_args(["--config", str(path)])
    assert [getattr(config, k) for k in words] == [False, False, False, False, True, True, True, True]
    assert config_values({"random_flip": " yes "}) == {"random_flip": True}


def test_a_config_file_boolean_of_another_word_is_one_line_naming_the_file_key_and_spellings(tmp_path, capsys):
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text('random_flip: "maybe"\n')
    assert main(["--config", str(path), "--output_dir", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: random_flip 'maybe' is not a boolean (true/yes/1/on or false/no/0/off)"
    ]
    assert not out.exists()


def test_config_sources_that_do_not_exist_or_are_not_yaml_or_json(tmp_path):
    with pytest.raises(ValueError, match=r"'nope' is neither a file nor a recipe \(recipes: "):
        parse_args(["--config", "nope"])
    (tmp_path / "run.toml").write_text("loss = 'vlb'\n")
    with pytest.raises(ValueError, match=r"must end in one of \.yaml, \.yml, \.json"):
        read_config_file(str(tmp_path / "run.toml"))
    (tmp_path / "run.json").write_text("{'loss': 1}")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_config_file(str(tmp_path / "run.json"))
    assert config_values({"num_train_timesteps": 4000}) == {"ddpm_num_steps": 4000}  # diffusers' name as a key


def test_a_source_chosen_on_the_command_line_replaces_the_files_competing_one(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "dataset_name: uoft-cs/cifar10\nmodel_config: ddpm-cifar10-32\ndropout: 0.1\nsave_images_steps: 9\n"
    )
    config = parse_args(["--config", str(path), "--train_data_dir", "imgs", "--save_images_epochs", "2"])
    assert (config.train_data_dir, config.dataset_name, config.save_images_epochs, config.save_images_steps) == (
        "imgs",
        None,
        2,
        None,
    )
    assert (config.model_config, config.dropout) == ("ddpm-cifar10-32", 0.1)  # untouched: no competing flag given
    config = parse_args(["--config", str(path), "--train_data_files", "train-*.parquet"])
    assert (config.train_data_files, config.dataset_name, config.train_data_dir) == ("train-*.parquet", None, None)
    config = parse_args(["--config", str(path), "--pretrained_model_name_or_path", "outputs/run"])
    assert (config.model_config, config.dropout, config.dataset_name) == (None, None, "uoft-cs/cifar10")
    with pytest.raises(ValueError, match="not both"):  # both on the command line: still refused
        parse_args(["--dataset_name", "a", "--train_data_dir", "b"])
    path.write_text("overwrite_output_dir: true\n")  # a run's training_args.json, resumed: the run goes on
    assert not parse_args(["--config", str(path), "--resume_from_checkpoint", "latest"]).overwrite_output_dir
    with pytest.raises(ValueError, match="--overwrite_output_dir deletes it: pass one"):
        parse_args(["--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    path.write_text("resume_from_checkpoint: latest\n")  # a resumed run's training_args.json, started over
    config = parse_args(["--config", str(path), "--overwrite_output_dir"])
    assert config.overwrite_output_dir and config.resume_from_checkpoint is None
    assert parse_args(["--config", str(path), "--no-overwrite_output_dir"]).resume_from_checkpoint == "latest"


def test_num_epochs_on_the_command_line_replaces_the_files_max_train_steps(tmp_path):
    """`--config ddpm-cifar10 --num_epochs 1` trains one epoch, not the recipe's 800000 steps (a whole run:
    test_recipes.py); so does a run's training_args.json, which holds both. The reverse needs no replacing: a
    --max_train_steps given is the run's length whatever the file's --num_epochs."""
    config = parse_args(["--config", "ddpm-cifar10", "--train_data_dir", "images", "--num_epochs", "1"])
    assert (config.num_epochs, config.max_train_steps) == (1, None)
    assert optimizer_steps(resolve(config, RunFacts())[0], batches_per_epoch=390) == 390  # CIFAR-10 at 128: 1 epoch
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(resolve(parse_args(["--max_train_steps", "7"]), RunFacts())[0].to_json()))
    assert json.loads(path.read_text())["num_epochs"] == 40  # the file holds both: 40 epochs (the default), 7 steps
    again = parse_args(["--config", str(path), "--num_epochs", "2"])
    assert (again.num_epochs, again.max_train_steps) == (2, None)
    assert optimizer_steps(resolve(again, RunFacts())[0], batches_per_epoch=25) == 50
    reverse = parse_args(["--config", str(path), "--max_train_steps", "3"])
    assert optimizer_steps(resolve(reverse, RunFacts())[0], batches_per_epoch=25) == 3  # not the file's 40 epochs


def test_num_epochs_given_to_resume_a_run_measured_in_steps_is_a_change_of_its_length(tmp_path):
    """A run of --max_train_steps 80 resumed from its training_args.json with --num_epochs 3: the file's
    --max_train_steps is dropped, and the epochs are a new length, refused unless --allow_schedule_change (not the
    run's 80 steps kept in silence)."""
    saved = {"max_train_steps": 80, "num_epochs": 40, "lr_scheduler": "cosine", "lr_warmup_steps": 8,
             "learning_rate": 2e-3, "total_steps": 80}  # fmt: skip
    facts = RunFacts(resume_path="out/checkpoint-40", resumed_schedule=saved, train_images=1600)
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps({"max_train_steps": 80, "num_epochs": 40, "resume_from_checkpoint": "latest"}))
    assert resolve(parse_args(["--config", str(path)]), facts)[0].max_train_steps == 80  # the run as it was
    with pytest.raises(ValueError, match=r"--num_epochs 3 \(the run's length: 80 optimizer steps, by "
                                         r"--max_train_steps\)\. Drop the flag"):  # fmt: skip
        resolve(parse_args(["--config", str(path), "--num_epochs", "3"]), facts)
    changed, notes = resolve(parse_args(["--config", str(path), "--num_epochs", "3", "--allow_schedule_change"]), facts)
    assert (changed.num_epochs, changed.max_train_steps) == (3, None)  # the length from the epochs
    assert optimizer_steps(changed, batches_per_epoch=25) == 75
    with pytest.raises(ValueError, match=r"--num_epochs 3 \(the run's length: 80 optimizer steps"):
        resolve(parse_args(["--resume_from_checkpoint", "latest", "--num_epochs", "3"]), facts)  # a plain resume too


def test_every_flag_name_is_a_config_key_that_means_what_the_flag_means():
    """Aliases (num_train_timesteps), negations (random_crop: true is center_crop false; no-use_ema) and either
    spelling (output-dir): a config file takes any flag's name, as the command line does."""
    parser = build_parser()
    checked = 0
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for flag in action.option_strings:
            if action.nargs == 0:  # a boolean flag: true means what giving it means
                expected = getattr(parser.parse_args([flag]), action.dest)
                keys = {flag.removeprefix("--"): True, canonical(flag): True}
                assert all(config_values({k: v}) == {action.dest: expected} for k, v in keys.items()), flag
                assert config_values({canonical(flag): False}) == {action.dest: not expected}, flag
            else:
                text = action.choices[0] if action.choices else "1"
                value = getattr(parser.parse_args([flag, text]), action.dest)
                for key in (flag.removeprefix("--"), flag.removeprefix("--").replace("_", "-")):
                    assert config_values({key: value}) == {action.dest: value}, key
            checked += 1
    assert checked > len(dataclasses.fields(TrainingConfig))  # the aliases and negations too
    assert config_values({"random_crop": True}) == {"center_crop": False}
    assert config_values({"no-use_ema": True, "output-dir": "x"}) == {"use_ema": False, "output_dir": "x"}
    with pytest.raises(ValueError, match=r"unknown option 'random_crp' \(did you mean random_crop\?\)"):
        config_values({"random_crp": True})


def test_a_config_file_with_random_crop_trains_with_random_crops(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("random_crop: true\nnum_train_timesteps: 40\n")
    config = parse_args(["--config", str(path)])
    assert (config.center_crop, config.ddpm_num_steps) == (False, 40)
    assert parse_args(["--config", str(path), "--center_crop"]).center_crop  # the command line wins


@pytest.mark.parametrize(
    "values, match",
    [
        ({"ddpm_num_steps": 100, "num_train_timesteps": 200},
         "'ddpm_num_steps': 100 and 'num_train_timesteps': 200 set one option, ddpm_num_steps, to different values: "
         "keep one"),
        ({"center_crop": True, "random_crop": True},
         "'center_crop': True and 'random_crop': True contradict each other (one negates the other, center_crop): "
         "keep one"),
        ({"use_ema": True, "no-use_ema": True},
         "'use_ema': True and 'no-use_ema': True contradict each other (one negates the other, use_ema): keep one"),
        ({"eval_num_images": 8, "num_images": 16},
         "'eval_num_images': 8 and 'num_images': 16 set one option, eval_num_images, to different values: keep one"),
    ],
)  # fmt: skip
def test_two_keys_of_one_option_with_different_values_are_refused_naming_both(tmp_path, capsys, values, match):
    path, out = tmp_path / "run.json", tmp_path / "out"
    path.write_text(json.dumps(values))
    assert main(["--config", str(path), "--output_dir", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {path}: {match}"]
    assert not out.exists()


def test_two_names_of_one_option_that_agree_are_one_option():
    assert config_values({"ddpm_num_steps": 100, "num_train_timesteps": 100}) == {"ddpm_num_steps": 100}
    assert config_values({"center_crop": True, "random_crop": False}) == {"center_crop": True}
    assert parse_args(["--ddpm_num_steps", "100", "--num_train_timesteps", "100"]).ddpm_num_steps == 100
    assert parse_args(["--eval_num_images", "8", "--num_images", "8"]).eval_num_images == 8
    # one flag given twice keeps argparse's rule, the last wins (a command line with an override appended)
    assert parse_args(["--ddpm_num_steps", "100", "--ddpm_num_steps", "200"]).ddpm_num_steps == 200
