"""Checks of command-line values that several benchmark scripts share, made before any work starts."""

from __future__ import annotations

import os


def unwritable_out(path: str, flag: str = "--out") -> str | None:
    """Why the results file `path` can't be written (checked before the benchmark runs, not after), or None.
    Makes its folder if missing, as the scripts' README commands (`--out runs/x.json`) expect."""
    from deltatune.checkpoint import unwritable

    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give the name of a file to write"
    # an existing file is written in place (`open(path, "w")`), whatever its folder takes: /dev/null too
    if os.path.exists(path) and os.access(path, os.W_OK):
        return None
    folder = os.path.dirname(path) or "."
    if why := unwritable(folder):
        return f"{flag} {path}: can't write into {folder} ({why}); pick a folder that can be written"
    return None


def unwritable_folder(path: str, flag: str) -> str | None:
    """Why files can't be written into the folder `path` (a file there, a read-only or missing place), or None.
    Makes the folder if missing."""
    from deltatune.checkpoint import unwritable

    if why := unwritable(path):
        return f"{flag} {path}: {why}; pick a folder that can be written (it is made if missing)"
    return None


def below_one(args, flags: tuple[str, ...]) -> str | None:
    """The first of `flags` (argparse dests) whose value is under 1, as an error message, or None."""
    for flag in flags:
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
    return None


def comma_ints(text: str) -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None if `text` is empty or any part isn't a whole number."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    return values or None
