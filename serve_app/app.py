"""The one builder that makes the genguard application from validated config.

``serve run configs/local.yaml`` calls ``build_app(args)`` with the file's
``applications[].args``; tests call the same function.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import load_app_config
from serve_app.models.deployment import ModelDeployment
from serve_app.router import Router


def build_app(args: dict[str, Any]) -> Application:
    cfg = load_app_config(args)
    models = {
        key: ModelDeployment.options(name=key).bind(
            key,
            mcfg.model_dump(mode="json"),
            cfg.resolve_source(key),
            cfg.fault_injection.model_dump(mode="json"),
        )
        for key, mcfg in cfg.models.items()
    }
    return Router.options(name="router").bind(cfg.model_dump(mode="json"), models)
