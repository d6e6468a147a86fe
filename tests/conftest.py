"""Shared test helpers: configs derived from configs/local.yaml."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_serve_config(name: str = "local") -> dict[str, Any]:
    with open(ROOT / "configs" / f"{name}.yaml") as fh:
        return yaml.safe_load(fh)


def local_args() -> dict[str, Any]:
    """A deep copy of configs/local.yaml's application args."""
    return copy.deepcopy(load_serve_config("local")["applications"][0]["args"])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model directory: $GENGUARD_TINY_DIR (make test) or a fresh build."""
    given = os.environ.get("GENGUARD_TINY_DIR")
    if given:
        path = Path(given)
    else:
        path = ROOT / ".models" / "tiny"
    from serve_app.tiny import build

    build(path)
    return path
