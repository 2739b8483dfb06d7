"""Commands this package prints for the user to run next (the trainer's closing summary, the model card, error
messages), spelled so that they run as printed from the current directory: a console script by its bare name
when it is on PATH, else by its path (e.g. `.venv/bin/vkd-export` when the environment is not activated), else as
`python -m MODULE`."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    absolute = Path(path).expanduser().resolve()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def tool(name: str) -> str:
    """How to call console script `name` (vkd-export, ...) from here."""
    beside = Path(sys.executable).parent / name  # the scripts of the environment running this process
    found = shutil.which(name)
    if found and (not beside.is_file() or os.path.samefile(found, beside)):
        return name
    if beside.is_file():
        return shlex.quote(shown_path(beside) if "/" in shown_path(beside) else f"./{shown_path(beside)}")
    module = _module(name)
    return f"{shlex.quote(sys.executable)} -m {module}" if module else name


def _module(name: str) -> str:
    """The module of console script `name` ("" when no installed package has one)."""
    from importlib.metadata import entry_points

    return next((entry.value.split(":")[0] for entry in entry_points(group="console_scripts", name=name)), "")


def command(name: str, *args: str | Path) -> str:
    """A whole command line: `tool(name)` and its arguments, quoted for a POSIX shell."""
    return " ".join([tool(name), *(shlex.quote(str(a)) for a in args)])
