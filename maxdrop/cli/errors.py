"""How the ``maxdrop`` command reports bad input (one paragraph, exit 2) and failed runs (exit 1)."""

from __future__ import annotations

import re
import sys
import textwrap
from typing import NoReturn

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["INPUT_ERRORS", "PROG", "RunFailed", "UsageError", "one_paragraph", "report", "simplify", "usage_error"]

PROG = "maxdrop"
#: The errors that bad input raises before the run starts (from our classes, Lightning, jsonargparse and the
#: OS): reported as one paragraph. Once the run has started nothing is treated as input (see RunFailed).
INPUT_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError, MisconfigurationException)


class UsageError(Exception):
    """Bad command-line input, reported as one paragraph and exit status 2."""


class RunFailed(Exception):
    """An exception (its ``__cause__``) raised after the run started: exit status 1 with its traceback."""


def one_paragraph(message: str, limit: int = 1200) -> str:
    """Collapse a (possibly nested, multi-line) error message into one line of at most ``limit`` chars."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Lines of jsonargparse's nested messages that only restate the types tried and the value given.
_NOISE = re.compile(
    r"^\s*(-\s*)?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"|Expected a <class 'NoneType'>|Expected a <class 'dict'>|Expected a path but)"
)


def simplify(message: str) -> str:
    """The part of a jsonargparse error message that says what is wrong."""
    missing = re.search(r"File does not exist: '?([^'\n]+)'?", message)
    if missing and 'key "config"' in message:
        return f"config file '{missing.group(1)}' does not exist (given to --config)"
    lines = [line for line in str(message).splitlines() if not _NOISE.match(line)]
    text = " ".join(lines)
    given = re.search(r"Given value: ([\w.]+)\n", str(message))  # the backbone's union type reports it so
    unknown = re.search(r"(module '[\w.]+' has no attribute '\w+'|No module named '[\w.]+')\.? Got value: (.+)$", text)
    if unknown is None and given:
        unknown = re.search(r"(module '[\w.]+' has no attribute '\w+'|No module named '[\w.]+')\.?()", text)
    if unknown:
        value = re.search(r"class_path='([^']+)'", unknown.group(2))
        where = ".".join(re.findall(r'Parser key "([^"]+)"', text))
        name = value.group(1) if value else (unknown.group(2).strip() or (given.group(1) if given else ""))
        return f"unknown class_path {name!r} (in {where}): {unknown.group(1)}"
    return text


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse re-raises a class's own error inside its own); a
    UsageError is the message we built for the user and is kept, whatever caused it."""
    while not isinstance(err, UsageError) and isinstance(err.__cause__, (UsageError, *INPUT_ERRORS)):
        err = err.__cause__
    return err


def usage_error(err: BaseException) -> UsageError:
    """Bad input found before the run started, as the one paragraph that says what is wrong."""
    cause = _root_cause(err)
    if isinstance(cause, UsageError):
        return cause
    return UsageError(str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}")


def report(message: str, status: int = 2, hint: str | None = None) -> NoReturn:
    """One paragraph on stderr, then exit: status 2 for bad input, 1 for a run that failed."""
    wrapped = textwrap.fill(
        one_paragraph(message),
        width=100,
        initial_indent=f"{PROG}: error: ",
        subsequent_indent="  ",
        break_on_hyphens=False,  # paths and options stay whole, so they can be copied
        break_long_words=False,
    )
    if hint is None:
        hint = f"`{PROG} --help` lists the options; " if status == 2 else ""
        hint += "MAXDROP_DEBUG=1 shows the traceback"
    sys.stderr.write(wrapped + (f"\n  ({hint})\n" if hint else "\n"))
    raise SystemExit(status)
