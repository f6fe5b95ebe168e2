"""Error types the command line maps to exit codes (see :mod:`flamingo_vlm.cli`), kept below the
modules that raise them so that nothing imports the CLI; :func:`one_line`, how every entry point
prints an error; and :func:`plain_help`, which every parser
built from docstrings (``flamingo-vlm``, ``python -m flamingo_vlm.train``) shares."""

import argparse
import re


class UsageError(ValueError):
    """Bad command-line input: flags that contradict each other or values out of range (exit code 2)."""


def one_line(e: BaseException | str) -> str:
    """An error's message as the command line prints it: one line, at most 2000 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``'s descriptions, taken from docstrings, without their reST markup (``x``,
    :class:`X`) in ``--help``, for it and its subcommands (and theirs: ``data write``, ...)."""

    def plain(text: str | None) -> str | None:
        return text and re.sub(r"``([^`]*)``", r"\1", re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text))

    parser.description = plain(parser.description)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for sub in set(action.choices.values()):
                plain_help(sub)
    return parser
