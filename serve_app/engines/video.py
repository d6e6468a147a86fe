"""Enhanced Video Engine: text-, image- and trajectory-to-video through their chains."""

from __future__ import annotations

from typing import Any

from serve_app.engines.base import Engine


class VideoEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("video", *args, **kwargs)
