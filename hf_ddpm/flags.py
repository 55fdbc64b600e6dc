"""The command-line parser of every hf_ddpm command: one flag style, and a mistake answered in two lines.

Flags are spelled with underscores (`--output_dir`, `--repo_id`), as diffusers' training scripts spell them; the
dash spelling of any flag (`--output-dir`, `--repo-id`) is read as the same flag, so commands written for either
style keep working. A flag the command does not know is answered with one line that names it and the nearest known
flag, then a one-line usage, instead of the whole usage of a command with a hundred flags:

    python -m hf_ddpm evaluate: error: unrecognized flag --num_imgs (did you mean --num_images?)
    usage: python -m hf_ddpm evaluate [options] model   (--help describes every flag)

    parser = FlagParser(prog="...", description="...")   # everything else as argparse.ArgumentParser

The values of flags: a config file's value typed as the command line would give it (`config_value`; a quoted "no"
is False), a number checked against its flag's range (`check_number`: finite, and within its ends), a local path
made absolute (`absolute_path`) or checked before any work for what will be written there (`check_writable`); a
JSON or YAML file of flag: value pairs read (`read_flag_file`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import operator
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import NoReturn

import yaml


def canonical(flag: str) -> str:
    """The spelling-independent name of a long flag: `--output-dir` and `--output_dir` both give `output_dir`."""
    return flag.lstrip("-").replace("-", "_")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows a flag's non-trivial default unless its help text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        trivial = action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS
        if trivial or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class FlagParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that reads the dash spelling of every underscore flag (and the reverse), and answers
    an unknown flag, a missing one or a bad choice with one error line (with the nearest flag or choice) and a
    one-line usage; `--help` shows the defaults. Subcommands made with `add_subparsers` are FlagParsers too. A flag
    is read whole, as a config file's key is: a prefix (`--max_train_step`) is an unknown flag with the nearest named,
    never silently one flag today and ambiguous once another flag shares it."""

    SPELLING = "Flags are spelled with underscores; each is also read with dashes in their place."

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", self.SPELLING)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def long_flags(self) -> dict[str, str]:
        """{canonical name: the flag as declared} for this parser's long flags."""
        return {canonical(s): s for a in self._actions for s in a.option_strings if s.startswith("--")}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.respell(args), namespace)

    def respell(self, args: list[str]) -> list[str]:
        """`args` with each long flag this parser knows under another spelling written as declared."""
        flags = self.long_flags()
        out = []
        for i, token in enumerate(args):
            if token == "--":  # what follows is positional
                return out + args[i:]
            name, eq, value = token.partition("=")
            if name.startswith("--") and name not in self._option_string_actions:
                name = flags.get(canonical(name), name)
            out.append(name + eq + value)
        return out

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.chosen_subcommand(namespace).unrecognized(extras)
        return namespace

    def chosen_subcommand(self, namespace) -> FlagParser:
        """The innermost subcommand parser `namespace` came through (the one that knows the flags of the command)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                parser = action.choices.get(getattr(namespace, action.dest, None))
                if isinstance(parser, FlagParser):
                    return parser.chosen_subcommand(namespace)
        return self

    def nearest(self, word: str, choices) -> str | None:
        found = difflib.get_close_matches(canonical(word), [canonical(c) for c in choices], n=1, cutoff=0.6)
        return next((c for c in choices if found and canonical(c) == found[0]), None)

    def unrecognized(self, extras: list[str]) -> NoReturn:
        flags = [e.partition("=")[0] for e in extras if e.startswith("-") and e != "-"]
        if not flags:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        known = list(self.long_flags().values())
        said = []
        for flag in flags:
            near = self.nearest(flag, known)
            said.append(f"{flag} (did you mean {near}?)" if near else flag)
        self.error(f"unrecognized flag{'s' if len(said) > 1 else ''} {', '.join(said)}")

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            # Python 3.11 quotes the choices, later versions do not
            choices = re.findall(r"'([^']*)'", choice[2]) or [c.strip() for c in choice[2].split(",")]
            near = self.nearest(choice[1], choices)
            message += f"; did you mean {near!r}?" if near else ""
        self.exit(2, f"{self.prog}: error: {message}\n{self.short_usage()}\n")

    def short_usage(self) -> str:
        """`usage: PROG [options] POSITIONALS --REQUIRED ...`: what must be given, on one line."""
        needed = [a for a in self._actions if not a.option_strings or a.required]
        formatter = self.formatter_class(prog=f"{self.prog} [options]", width=10_000)
        formatter.add_usage(None, needed, [])
        return formatter.format_help().strip() + "   (--help describes every flag)"


# ------------------------------------------------------------------------------------------------ values of flags

# The spellings of a boolean in a config file (a quoted YAML "no", a JSON "false"), as argparse-style parsers read
# them; case is ignored. Anything else is refused: bool("no") is True.
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
BOOLEANS = f"a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})"


def parse_bool(text: str) -> bool:
    """'yes' -> True, 'Off' -> False; any other word is a ValueError naming the allowed spellings (BOOLEANS)."""
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{text!r} is not {BOOLEANS}")


BOUNDS = ("min", "max", "above", "below")  # the ends `check_number` takes: min <= value <= max, above < value < below


def check_number(flag: str, value, min=None, max=None, above=None, below=None) -> None:  # noqa: A002
    """Raise ValueError unless `value` is a finite number within the ends given, naming the flag, the value, the end
    it passes and the whole range: `--learning_rate must be >= 0, got -1`, `--adam_beta1 must be < 1, got 1.5
    (allowed: [0, 1))`, `--max_grad_norm must be a finite number >= 0, got nan`. Not a number (None, a str): passes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    ends = [(end, sign) for end, sign in ((min, ">="), (above, ">"), (max, "<="), (below, "<")) if end is not None]
    said = {sign: f"{sign} {end}" for end, sign in ends}
    if len(ends) == 2:  # an interval: [0, 1), (0, 1], ...
        (low, low_sign), (high, high_sign) = ends
        allowed = f"in {'[' if low_sign == '>=' else '('}{low}, {high}{']' if high_sign == '<=' else ')'}"
    else:
        allowed = " ".join(said.values())
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be {' '.join(w for w in ('a finite number', allowed) if w)}, got {value}")
    test = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
    for end, sign in ends:
        if not test[sign](value, end):
            whole = f" (allowed: {allowed.removeprefix('in ')})" if len(ends) == 2 else ""
            raise ValueError(f"{flag} must be {said[sign]}, got {value}{whole}")


def hint_kind(hint) -> tuple[type, tuple | None, bool]:
    """(type, choices, optional) of a flag's type hint: `Literal[...] | None` -> (str, its values, True)."""
    members = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = list(typing.get_args(hint))
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    if len(members) == 1 and typing.get_origin(members[0]) is typing.Literal:
        return str, typing.get_args(members[0]), optional
    return (members[0] if len(members) == 1 else object), None, optional


def config_value(key, value, kind, choices, optional, parse, source):
    """A config file's value of a flag (`key`, read from `source`) as the command line would give it: typed by
    `hint_kind`'s kind and choices and by the flag's `parse`; or a ValueError naming it and what is allowed."""
    allowed = kind.__name__ if parse is None else "a number"
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {key} cannot be null; allowed: {allowed}")
    if isinstance(value, str) and kind is not str:
        try:
            value = (parse or {bool: parse_bool}.get(kind, kind))(value)  # YAML reads 2e-4 (no dot) as a str
        except ValueError:
            raise ValueError(f"{source}: {key} {value!r} is not {BOOLEANS if kind is bool else allowed}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, (int, float)) if parse else isinstance(value, kind)
    if not ok or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{source}: {key} must be {allowed}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"{source}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def absolute_path(value, local: bool = False, many: bool = False):
    """A flag's value made absolute where it names a local path, so that a file of the values (training_args.json)
    names the same files from any working directory. local: the flag always names one (--output_dir); else only a
    value that exists as a path is one (not a Hub id, a preset name, 'latest'). many: comma-separated paths or glob
    patterns (--train_data_files), each made absolute."""
    if not isinstance(value, str):
        return value
    parts = [part.strip() for part in value.split(",") if part.strip()] if many else [value]
    return ",".join(os.path.abspath(part) if local or os.path.exists(part) else part for part in parts)


FLAG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


class _DuplicateKey(Exception):
    def __init__(self, key, where: str = ""):
        self.key, self.where = key, where


# A key written twice is refused, in YAML and JSON alike: both parsers would keep the last value silently, so a
# file edited by appending `learning_rate: 1e-4` would train on whichever line came last, unseen.
def _unique_keys(pairs: list[tuple]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # no option's name: the loader's own checks answer it
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key, f" (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_flag_file(path: Path, flag: str) -> dict:
    """The mapping of flag name: value that a JSON or YAML file (given with `flag`) holds, as written (`config_value`
    types each value); or a ValueError naming the file and what is wrong with it. An empty file holds none."""
    if path.suffix not in FLAG_FILE_SUFFIXES:
        raise ValueError(f"{flag} {path}: the file must end in one of {', '.join(FLAG_FILE_SUFFIXES)}")
    text = path.read_text()
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else _load_yaml(text)
    except _DuplicateKey as twice:
        raise ValueError(f"{flag} {path} gives {twice.key!r} twice{twice.where}: keep one") from None
    except (ValueError, yaml.YAMLError) as err:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{flag} {path} is not valid {kind}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def check_writable(flag: str, value: str, kind: str) -> None:
    """Refuse a --flag path that cannot be written, before any work: `kind` "file" (written atomically beside
    itself, its missing directories made) or "directory" (made with its parents where missing)."""
    path = Path(value).absolute()
    if kind == "file" and path.is_dir():
        raise ValueError(
            f"--{flag} {value} is a directory; pass the path of a JSON file, e.g. {Path(value) / 'metrics.json'}"
        )
    if kind == "directory" and path.exists() and not path.is_dir():
        raise ValueError(f"--{flag} {value} is a file; pass a directory (an existing one, or a new one to make)")
    if kind == "directory" and path.is_dir():
        return  # used as it is (a --sample_dir whose shards are all drawn is only read)
    existing = path.parent
    while not existing.exists():  # the nearest directory that exists: the missing ones are made inside it
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"--{flag} {value}: {existing} is a file, so no {kind} can be made under it; pass another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} {value}: the directory {existing} is not writable; pass a path where you can write")
