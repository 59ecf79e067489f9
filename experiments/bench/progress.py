"""Progress bars: what the measuring functions call (``progress(total=..., desc=...)``), tqdm
on stderr, or nothing with ``--quiet``."""

from __future__ import annotations

import sys
from typing import Any, Protocol

__all__ = ["Bar", "NullBar", "Progress", "make_progress"]


class Bar(Protocol):
    """A progress bar: advanced once per unit of work, closed at the end."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class Progress(Protocol):
    """Makes one bar: ``progress(total=blocks, desc="rep K=4")``."""

    def __call__(self, *, total: int, desc: str) -> Bar: ...


class NullBar:
    """The bar of a quiet run: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(quiet: bool) -> Progress:
    """tqdm bars on stderr that vanish when done, or :class:`NullBar` when ``quiet``."""

    def progress(*, total: int, desc: str) -> Bar:
        if quiet:
            return NullBar()
        # imported on first use: a quiet run never loads tqdm (nor its notebook detection)
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar: Bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        return bar

    return progress
