"""Test helpers: a fake clock whose async ``sleep`` advances time instantly."""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """A manual clock: ``clock()`` reads it, ``advance(s)`` moves it.

    Pass ``clock`` as any component's ``clock`` and ``clock.sleep`` as a
    ``sleep``: backoffs then take no real time but move the clock.
    """

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = float(start)
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Record the sleep, advance the clock, yield to the loop once."""
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
