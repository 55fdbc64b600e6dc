"""The command-line parser of every hf_ddpm command: one flag style, and a mistake answered in two lines.

Flags are spelled with underscores (`--output_dir`, `--repo_id`), as diffusers' training scripts spell them; the
dash spelling of any flag (`--output-dir`, `--repo-id`) is read as the same flag, so commands written for either
style keep working. A flag the command does not know is answered with one line that names it and the nearest known
flag, then a one-line usage, instead of the whole usage of a command with a hundred flags:

    python -m hf_ddpm evaluate: error: unrecognized flag --num_imgs (did you mean --num_images?)
    usage: python -m hf_ddpm evaluate [options] model   (--help describes every flag)

    parser = FlagParser(prog="...", description="...")   # everything else as argparse.ArgumentParser
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn


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
    one-line usage; `--help` shows the defaults. Subcommands made with `add_subparsers` are FlagParsers too."""

    SPELLING = "Flags are spelled with underscores; each is also read with dashes in their place."

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", self.SPELLING)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
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
