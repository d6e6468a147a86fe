"""Config loading: the shipped files validate, and bad files name the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, load_app_config
from serve_app.params import MODEL_KEYS, WORKFLOWS
from tests.conftest import load_serve_config, local_args

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["local", "production", "chaos"])
def test_shipped_configs_validate(name: str) -> None:
    """Every shipped Serve config has valid genguard args with all models and workflows."""
    doc = load_serve_config(name)
    app = doc["applications"][0]
    cfg = load_app_config(app["args"])
    assert sorted(cfg.models) == sorted(MODEL_KEYS)
    assert sorted(cfg.workflows) == sorted(WORKFLOWS)
    names = {d["name"] for d in app["deployments"]}
    assert names == set(MODEL_KEYS) | {"router"}
    assert doc["http_options"]["request_timeout_s"] > cfg.deadline.max_s


def test_local_max_steps_at_least_50() -> None:
    """The local config lets every model take at least 50 steps."""
    cfg = load_app_config(local_args())
    assert all(m.constraints.max_steps >= 50 for m in cfg.models.values())


def test_default_chains_match_api() -> None:
    """The local chains are API.md's default chains."""
    cfg = load_app_config(local_args())
    assert cfg.workflow_models("text-to-image") == ["qwen-image", "newbie-image"]
    assert cfg.workflow_models("image-edit") == ["qwen-image-edit", "qwen-image"]
    assert cfg.workflow_models("text-to-video") == ["hunyuan-video", "wan-t2v"]
    assert cfg.workflow_models("image-to-video") == ["wan-i2v", "wan-ati"]
    assert cfg.workflow_models("trajectory-to-video") == ["wan-ati", "wan-i2v"]
    assert cfg.workflows["trajectory-to-video"].chain[1].drops == ("trajectories",)


def _err(args: dict) -> str:
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    return str(info.value)


def test_unknown_model_in_chain_names_it() -> None:
    """A chain naming an unconfigured model fails with the chain path and the name."""
    args = local_args()
    args["workflows"]["text-to-image"]["chain"] = ["qwen-image", "qwen-imag"]
    msg = _err(args)
    assert "workflows.text-to-image.chain.1" in msg and "qwen-imag" in msg


def test_cycle_in_chain_is_rejected() -> None:
    """A model appearing twice in one chain is a cycle and is named."""
    args = local_args()
    args["workflows"]["text-to-video"]["chain"] = ["hunyuan-video", "wan-t2v", "hunyuan-video"]
    msg = _err(args)
    assert "workflows.text-to-video.chain.2" in msg and "twice" in msg


def test_capability_mismatch_is_rejected() -> None:
    """A video model in an image chain, or an undeclared substitute, is a start-up error."""
    args = local_args()
    args["workflows"]["text-to-image"]["chain"] = ["qwen-image", "wan-t2v"]
    assert "produces video" in _err(args)
    args = local_args()
    args["workflows"]["trajectory-to-video"]["chain"] = ["wan-ati", "wan-i2v"]
    msg = _err(args)
    assert "cannot use trajectories" in msg and "drops" in msg
    args = local_args()
    args["workflows"]["text-to-image"]["chain"] = ["qwen-image-edit"]
    assert "needs image" in _err(args)


def test_unknown_key_and_bad_value_name_the_path() -> None:
    """A typo'd key or an impossible value fails with its dotted location."""
    args = local_args()
    args["models"]["wan-t2v"]["constraints"]["max_step"] = 10
    msg = _err(args)
    assert "models.wan-t2v.constraints.max_step" in msg
    args = local_args()
    args["models"]["wan-t2v"]["constraints"]["frames"]["min_frames"] = 99
    assert "min_frames must not exceed max_frames" in _err(args)
    args = local_args()
    args["deadline"] = {"default_s": 500, "max_s": 300}
    assert "default_s must not exceed max_s" in _err(args)


def test_subset_of_workflows_is_allowed_but_not_none() -> None:
    """An image-only deployment may configure a subset of workflows, not zero."""
    args = local_args()
    del args["workflows"]["image-edit"]
    assert "image-edit" not in load_app_config(args).workflows
    args["workflows"] = {}
    assert "at least one workflow" in _err(args)


def test_bad_resilience_policy_names_the_key() -> None:
    """An impossible retry or breaker policy fails at start naming its path."""
    args = local_args()
    args["resilience"] = {"retry": {"max_attempts": 0}}
    assert "resilience.retry.max_attempts" in _err(args)
    args["resilience"] = {"breaker": {"wait_in_open_s": -1}}
    assert "resilience.breaker.wait_in_open_s" in _err(args)


def test_fault_injection_is_not_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment variable cannot turn fault injection on."""
    monkeypatch.setenv("GENGUARD_FAULT_INJECTION", "true")
    monkeypatch.setenv("GENGUARD_FAULT_INJECTION__ENABLED", "true")
    assert load_app_config(local_args()).fault_injection.enabled is False


def test_chaos_differs_from_local_only_by_fault_injection() -> None:
    """configs/chaos.yaml is configs/local.yaml plus fault_injection.enabled."""
    local, chaos = load_serve_config("local"), load_serve_config("chaos")
    assert chaos["applications"][0]["args"]["fault_injection"] == {"enabled": True}
    chaos["applications"][0]["args"]["fault_injection"] = local["applications"][0]["args"]["fault_injection"]
    assert chaos == local


def test_relative_source_resolves_to_repo_models_root() -> None:
    """A relative local source resolves to an absolute path under models_root."""
    cfg = load_app_config(local_args())
    src = cfg.resolve_source("qwen-image")
    assert src.startswith("/") and src.endswith(".models/tiny/qwen-image")


def test_repo_id_source_is_passed_through() -> None:
    """A hub repo id (production) is handed to from_pretrained unchanged."""
    args = load_serve_config("production")["applications"][0]["args"]
    cfg = load_app_config(args)
    assert cfg.resolve_source("wan-t2v") == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
