"""Small shared helpers: clock type, config building, rolling windows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError

Clock = Callable[[], float]
"""A zero-argument callable returning seconds (``time.time``, ``time.monotonic``)."""

T = TypeVar("T")


def build_policy(cls: type[T], data: Mapping[str, Any] | object | None, path: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping (e.g. a pydantic
    ``model_dump()``), naming the offending key on error."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        dump = getattr(data, "model_dump", None)
        if dump is None:
            raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}", key=path)
        data = dump()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: model_dump() did not return a mapping", key=path)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{path}.{key}: unknown setting; known: {', '.join(sorted(names))}",
                key=f"{path}.{key}",
            )
    try:
        return cls(**data)
    except ConfigError as exc:
        sub = exc.key
        key = f"{path}.{sub}" if sub else path
        raise ConfigError(f"{path}.{exc.message}", key=key) from exc
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}", key=path) from exc


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {message}", key=key)


class RollingCounts:
    """Counters over a sliding time window, kept in ``n_buckets`` fixed buckets.

    Memory is ``n_buckets * n_fields`` integers whatever the event rate.
    """

    __slots__ = ("_clock", "_counts", "_epochs", "_n", "_width_s", "n_fields", "window_s")

    def __init__(self, window_s: float, n_fields: int, clock: Clock, n_buckets: int = 10) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = float(window_s)
        self.n_fields = n_fields
        self._n = max(1, n_buckets)
        self._width_s = self.window_s / self._n
        self._clock = clock
        self._epochs = [-(2**62)] * self._n
        self._counts = [[0] * n_fields for _ in range(self._n)]

    def _epoch(self) -> int:
        return math.floor(self._clock() / self._width_s)

    def add(self, field: int, amount: int = 1) -> None:
        """Add ``amount`` to ``field`` in the current bucket."""
        e = self._epoch()
        i = e % self._n
        if self._epochs[i] != e:
            self._epochs[i] = e
            row = self._counts[i]
            for j in range(self.n_fields):
                row[j] = 0
        self._counts[i][field] += amount

    def totals(self) -> list[int]:
        """Per-field sums over the buckets still inside the window."""
        e = self._epoch()
        out = [0] * self.n_fields
        low = e - self._n
        for i in range(self._n):
            if low < self._epochs[i] <= e:
                row = self._counts[i]
                for j in range(self.n_fields):
                    out[j] += row[j]
        return out

    def clear(self) -> None:
        """Forget everything."""
        self._epochs = [-(2**62)] * self._n
        self._counts = [[0] * self.n_fields for _ in range(self._n)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {"epochs": list(self._epochs), "counts": [list(r) for r in self._counts]}

    def load(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`to_dict` output (ignored if the shape differs)."""
        epochs = list(data.get("epochs", []))
        counts = [list(r) for r in data.get("counts", [])]
        if len(epochs) == self._n and len(counts) == self._n:
            if all(len(r) == self.n_fields for r in counts):
                self._epochs = [int(x) for x in epochs]
                self._counts = [[int(x) for x in r] for r in counts]


# Latency histogram bins: upper edges 1 ms * 1.25**i, i = 0..(N-1); last bin open.
_LAT_BASE_S = 0.001
_LAT_RATIO = 1.25
LATENCY_BINS = 72  # 1 ms .. ~9e3 s


def latency_bin(latency_s: float) -> int:
    """Histogram bin of a latency (bin i holds values <= 1ms * 1.25**i)."""
    if latency_s <= _LAT_BASE_S:
        return 0
    i = math.ceil(math.log(latency_s / _LAT_BASE_S) / math.log(_LAT_RATIO) - 1e-9)
    return min(LATENCY_BINS - 1, max(0, i))


def bin_upper_s(i: int) -> float:
    """Upper edge of latency bin ``i`` in seconds."""
    return _LAT_BASE_S * _LAT_RATIO**i


def quantile_from_bins(bins: list[int], q: float) -> float | None:
    """Approximate quantile ``q`` (0..1) from histogram counts (bin upper edge)."""
    total = sum(bins)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(bins):
        seen += c
        if seen >= rank and c:
            return bin_upper_s(i)
    return bin_upper_s(len(bins) - 1)
