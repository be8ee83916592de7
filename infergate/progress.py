"""Progress bars for long command-line operations: on stderr, and only for a person watching.

A bar is drawn by `tqdm <https://tqdm.github.io>`_ on stderr, so stdout stays what scripts parse
(JSON, tables). It is on when stderr is a terminal, or when asked for (``--progress``); never in
the services, whose output goes to logs. Bars name steps and counts only, never a patient or a UID.
Core functions take a :class:`Progress` (default :func:`no_progress`) rather than importing tqdm, so
the decision stays with the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TextIO, TypeVar

from tqdm import tqdm

_T = TypeVar("_T")


class Progress(Protocol):
    """Wraps an iterable; ``total`` when the iterable has no length, ``desc`` names the step."""

    def __call__(self, items: Iterable[_T], *, total: int | None = None, desc: str = "") -> Iterable[_T]: ...


def no_progress(items: Iterable[_T], *, total: int | None = None, desc: str = "") -> Iterable[_T]:
    """No bar: the items as they are."""
    return items


def wanted(flag: bool | None, stream: TextIO | None = None) -> bool:
    """Whether to draw bars: as ``--progress``/``--no-progress`` say, else only if stderr is a terminal."""
    if flag is not None:
        return flag
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bars(enabled: bool, stream: TextIO | None = None) -> Progress:
    """A :class:`Progress` drawing tqdm bars on ``stream`` (stderr), or :func:`no_progress`."""
    if not enabled:
        return no_progress

    def bar(items: Iterable[_T], *, total: int | None = None, desc: str = "") -> Iterator[_T]:
        yield from tqdm(
            items,
            total=total,
            desc=desc or None,
            file=stream or sys.stderr,
            dynamic_ncols=True,
            mininterval=0.2,
            leave=True,
        )

    return bar
