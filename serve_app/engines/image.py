"""Enhanced Image Engine: text-to-image and image-edit through their chains."""

from __future__ import annotations

from typing import Any

from serve_app.engines.base import Engine


class ImageEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("image", *args, **kwargs)
