"""The command line of `training/train.py`: the parser built from the run config's fields, and `--config FILE`.

`--config` takes a JSON or YAML file of `flag_name: value` pairs, or the name of a shipped recipe (the papers'
settings, training/recipes/*.yaml: `--config ddpm-cifar10`); flags given on the command line win over the file.
Every name of a flag is a key (an alias, `random_crop`, `no-use_ema`, either spelling); two names of one option given
with different values, in the file or on the command line, are refused rather than one silently taken.
The fields, their defaults and the checks live in `config.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from pathlib import Path

from ..data.sources import DATA_SOURCES
from ..flags import FlagParser, canonical, config_value, hint_kind, read_flag_file
from ..shipped import shipped_dir
from .config import EXCLUSIVE, GROUPS, TrainingConfig

RECIPES_DIR = shipped_dir("recipes", "training/recipes")  # hf_ddpm/recipes inside the wheel


def _fields() -> list[tuple[str, dataclasses.Field, tuple]]:
    """(group title, field, `hint_kind` of its type hint) of every option, in `--help` order."""
    hints = typing.get_type_hints(TrainingConfig)
    return [(title, f, hint_kind(hints[f.name])) for title, options in GROUPS for f in dataclasses.fields(options)]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every run-config field: one group per options class, types and choices from the type hints,
    help and aliases from the field metadata. Flags read in either spelling (`--output-dir`: hf_ddpm.flags)."""
    p = FlagParser(
        prog="training/train.py",
        description="Train a DDPM (Ho et al. 2020) UNet2DModel with accelerate; with no flags, on the bundled digits.",
    )
    p.add_argument(
        "--config",
        help="a JSON or YAML file of option: value pairs, or a shipped recipe "
        f"({', '.join(recipe_names())}); flags on the command line win",
    )
    groups = {}
    for title, f, (kind, choices, _) in _fields():
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        meta = f.metadata
        names = (f"--{f.name}", *meta["aliases"])
        common = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if kind is bool and meta["negation"]:
            both = group.add_mutually_exclusive_group()
            both.add_argument(*names, action=_spelled(argparse._StoreTrueAction), **common)
            flag, text = meta["negation"]
            both.add_argument(flag, dest=f.name, action=_spelled(argparse._StoreFalseAction), help=text)
        elif kind is bool:  # --flag / --no-flag, so that the command line can undo a config file's value
            group.add_argument(*names, action=_spelled(argparse.BooleanOptionalAction), **common)
        else:
            group.add_argument(*names, action=_spelled(argparse._StoreAction), type=meta["parse"] or kind,
                               choices=choices, **common)  # fmt: skip
    return p


SPELLINGS = "spellings_given"  # the namespace's record of the flags that gave each option its value (`_spelled`)


def _spelled(action: type[argparse.Action]) -> type[argparse.Action]:
    """`action`, also recording under the namespace's SPELLINGS which of the option's flags gave which value, so that
    two names of one option with different values (`--ddpm_num_steps 100 --num_train_timesteps 200`) are refused
    (`parse_args`) instead of the last one silently taken. One flag given twice keeps argparse's rule: the last wins."""

    class Spelled(action):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            vars(namespace).setdefault(SPELLINGS, {}).setdefault(self.dest, {})[option_string] = getattr(
                namespace, self.dest
            )

    return Spelled


def _refuse_two_spellings(spellings: dict[str, dict[str, object]]) -> None:
    """ValueError naming both flags and their values where two names of one option were given different values."""
    for name, given in spellings.items():
        (a, x), *others = given.items()
        for b, y in others:
            if y != x:
                said = [flag if isinstance(v, bool) else f"{flag} {v}" for flag, v in ((a, x), (b, y))]
                raise ValueError(f"{said[0]} and {said[1]} set one option, --{name}, to different values: pass one")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_config(source: str) -> Path:
    """A config file's path: `source` itself, or the shipped recipe of that name."""
    if os.path.isfile(source):
        return Path(source)
    recipe = RECIPES_DIR / f"{source}.yaml"
    if os.sep not in source and recipe.is_file():
        return recipe
    raise ValueError(f"--config {source!r} is neither a file nor a recipe (recipes: {', '.join(recipe_names())})")


def read_config_file(source: str) -> dict:
    """The option values of a JSON or YAML config file (or shipped recipe), typed and checked like flags."""
    path = find_config(source)
    return config_values(read_flag_file(path, "--config"), str(path))


def config_keys() -> dict[str, tuple[str, bool]]:
    """{every flag's name, as `flags.canonical` spells it: (the field it sets, whether it negates it)}: each field's
    name and aliases, its negation flag (`random_crop` for center_crop) and, for another bool, `no_<name>`."""
    keys = {}
    for _, f, (kind, _, _) in _fields():
        for name in (f.name, *f.metadata["aliases"]):
            keys[canonical(name)] = (f.name, False)
        if kind is bool:
            negation = f.metadata["negation"][0] if f.metadata["negation"] else f"--no-{f.name}"
            keys[canonical(negation)] = (f.name, True)
    return keys


def config_values(data: dict, source: str = "the config") -> dict:
    """{flag name: value} -> {field: value}. A key is any name of a flag (`config_keys`: `num_train_timesteps`,
    `random_crop: true` for center_crop false, `no-use_ema`); an unknown key, a wrong type, a bad choice, or two keys
    of one option with different values are refused."""
    specs = {f.name: (f, kind) for _, f, kind in _fields()}
    keys = config_keys()
    values, keys_given = {}, {}
    for key, value in data.items():
        if canonical(key) not in keys:
            close = difflib.get_close_matches(canonical(key), list(keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{source}: unknown option {key!r}{hint}; allowed: {', '.join(specs)}, their aliases "
                             "and negations (random_crop, no_use_ema), as on the command line")  # fmt: skip
        name, negates = keys[canonical(key)]
        f, (kind, choices, optional) = specs[name]
        typed = config_value(key, value, kind, choices, optional, f.metadata["parse"], source)
        typed = not typed if negates else typed
        if name in values and values[name] != typed:
            other = keys_given[name]
            both = f"{source}: {other!r}: {data[other]!r} and {key!r}: {value!r}"
            if keys[canonical(other)][1] != negates:  # center_crop: true and random_crop: true
                raise ValueError(f"{both} contradict each other (one negates the other, {name}): keep one")
            raise ValueError(f"{both} set one option, {name}, to different values: keep one")
        values[name], keys_given[name] = typed, key
    return values


# A choice made on the command line replaces the config file's competing one: `--config ddpm-cifar10
# --train_data_dir ./my_images` trains the recipe on an image folder instead of the recipe's dataset, and
# `--num_epochs 1` trains one epoch instead of the recipe's --max_train_steps (the reverse needs no entry: a
# --max_train_steps given is the run's length whatever --num_epochs says, `resolve.optimizer_steps`).
REPLACES = {
    **{
        s: (*(o for o in DATA_SOURCES if o != s), *(() if s == "dataset_name" else ("dataset_config_name",)))
        for s in DATA_SOURCES
    },
    **{a: (b,) for pair in EXCLUSIVE for a, b in (pair, pair[::-1])},
    "pretrained_model_name_or_path": ("model_config", "dropout"),  # a pretrained UNet keeps its own dropout
    "num_epochs": ("max_train_steps",),  # the run's length: in epochs, as the command line says
    "resume_from_checkpoint": ("overwrite_output_dir",),  # a run's training_args.json, resumed: the run goes on
    "overwrite_output_dir": ("resume_from_checkpoint",),  # a resumed run's training_args.json, started over
}


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """The config a command line gives: the fields' defaults, then --config's values, then the flags given."""
    build_parser().parse_args(argv)  # --help (which shows the defaults) and usage errors
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # the namespace holds the flags given, and only those
    given = vars(parser.parse_args(argv))
    _refuse_two_spellings(given.pop(SPELLINGS, {}))
    source = given.pop("config", None)
    from_file = read_config_file(source) if source is not None else {}
    for name, value in given.items():
        if value is False:  # --no-<flag> makes no choice that competes with the file's
            continue
        for other in REPLACES.get(name, ()):
            from_file.pop(other, None)  # back to its default, unless the command line gives it too
    return TrainingConfig(**{**from_file, **given})
