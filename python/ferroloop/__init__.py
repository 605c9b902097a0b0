"""ferroloop: Python's asyncio event loop, written in Rust.

General layout: the loop's scheduler, timers, handles and I/O reactor are the Rust
extension ``ferroloop._ferroloop`` (``LoopCore``, ``Handle``, ``TimerHandle``);
``ferroloop._loop.Loop`` subclasses ``LoopCore`` and ``asyncio.AbstractEventLoop`` and adds
the once-per-loop parts in Python. This module is the public surface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._ferroloop import Handle, TimerHandle
from ._loop import Loop

__all__ = ["EventLoopPolicy", "Handle", "Loop", "TimerHandle", "install", "new_event_loop", "run"]
__version__ = "0.1.0"

_T = TypeVar("_T")


def new_event_loop() -> Loop:
    """Return a new ferroloop event loop."""
    return Loop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose loops are ferroloop loops."""

    def _loop_factory(self) -> Loop:  # type: ignore[override]
        return Loop()


def install() -> None:
    """Make ferroloop the loop that ``asyncio.new_event_loop()``/``asyncio.run()`` create."""
    asyncio.set_event_loop_policy(EventLoopPolicy())


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Run ``main`` on a new ferroloop loop, like ``asyncio.run``."""
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main)
