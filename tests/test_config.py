"""The run config (hf_ddpm/training/run_config.py) and its command line (hf_ddpm/training/config.py): the parser is
built from the fields, the config is checked once without being changed, `--config FILE` with overrides."""

import copy
import dataclasses
import json
import types
import typing

import pytest

from hf_ddpm.training import build_parser, run_config
from hf_ddpm.training.config import config_values, parse_args, read_config_file, serializable_args
from hf_ddpm.training.run_config import GROUPS, TrainingConfig, check_args

SESSION_3_FLAGS = set(
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
    assert SESSION_3_FLAGS <= flags  # every flag of the hand-written argparse namespace it replaced, names unchanged


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
    config = TrainingConfig()
    assert (config.learning_rate, config.adam_beta1, config.adam_beta2, config.ema_max_decay) == (
        2e-3,
        0.95,
        0.999,
        0.9999,
    )


def test_check_args_reads_the_config_and_never_changes_it(monkeypatch):
    config = TrainingConfig(loss="hybrid")  # the only implied value: hybrid's variance, set when the config is built
    assert config.variance_type == "learned_range"
    before = copy.deepcopy(config)
    check_args(config)
    assert config == before
    later = TrainingConfig()
    later.loss = "hybrid"  # changed after it was built: check_args accepts it and implies nothing
    check_args(later)
    assert later.variance_type is None

    calls = []
    monkeypatch.setattr(run_config, "check_args", lambda args: calls.append(args))
    parse_args(["--train_batch_size", "3"])
    assert len(calls) == 1  # once, when the config is built


def test_lower_bounds_are_field_metadata_and_name_the_flag():
    bounded = {f.name: f.metadata["min"] for f in dataclasses.fields(TrainingConfig) if f.metadata["min"] is not None}
    assert bounded["train_batch_size"] == 1 and bounded["learning_rate"] == 0 and bounded["resolution"] == 1
    for name, least in bounded.items():
        kind = type(TrainingConfig.__dataclass_fields__[name].default or least)
        with pytest.raises(ValueError, match=f"--{name} must be >= {least}, got {kind(least - 1)}"):
            TrainingConfig(**{name: kind(least - 1)})


def test_training_args_json_keeps_its_format_and_reads_back_as_a_config(tmp_path):
    config = parse_args(["--loss", "hybrid", "--random_crop", "--eval_size", "5", "--push_to_hub", "--hub_token", "t"])
    values = serializable_args(config)
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
    assert config.ddpm_beta_schedule == "cosine" and config.adam_beta1 == 0.95  # the rest: defaults
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
        ("learning_rate: null\n", "learning_rate cannot be null"),
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
