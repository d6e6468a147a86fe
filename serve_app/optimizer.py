"""Performance Optimizer: the per-request execution plan.

It owns the parameter side of resilience:

* the cluster degradation level's caps (fewer steps, smaller frames, shorter
  clips) through ``resilience.adjust_parameters``, always landing on values
  the target model accepts (multiples, 4k+1 frames);
* adapting a request to a fallback model's constraints;
* OOM: one retry at reduced parameters (the next rung down the ladder, or
  half the pixel area when the ladder has nothing left to take).

Every change is reported as an ``X-Adjustments`` item with its reason.
"""

from __future__ import annotations

from typing import Any

from resilience import DegradationLadder, ModelConstraints, adjust_parameters
from serve_app.config import MODEL_OUTPUT, AppConfig

PARAM_KEYS = ("width", "height", "num_inference_steps", "num_frames", "guidance_scale")


class Optimizer:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.ladder = DegradationLadder.from_config(list(cfg.resilience.degradation.levels))
        self.constraints = {k: ModelConstraints.coerce(m.constraints) for k, m in cfg.models.items()}

    @property
    def max_level(self) -> int:
        return self.ladder.max_level

    def _params(self, model: str, payload: dict[str, Any]) -> dict[str, Any]:
        p = {k: payload.get(k) for k in PARAM_KEYS}
        if MODEL_OUTPUT[model] != "video":
            p["num_frames"] = None
        elif p["num_frames"] is None:
            p["num_frames"] = self.cfg.models[model].defaults.num_frames or 9
        return p

    def plan(self, model: str, payload: dict[str, Any], level: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Parameters for ``model`` at degradation ``level`` (0 = none), fitted
        to its constraints, with the list of what changed."""
        rung = self.ladder[level] if level > 0 else None
        new, changes = adjust_parameters(self._params(model, payload), rung, self.constraints[model])
        floor = self.cfg.models[model].constraints.min_steps
        steps = new.get("num_inference_steps")
        if isinstance(steps, int) and steps < floor:
            for c in changes:
                if c["param"] == "num_inference_steps":
                    c["to"] = floor
            new["num_inference_steps"] = floor
            changes = [c for c in changes if c["param"] != "num_inference_steps" or c["from"] != c["to"]]
        out = {**payload, **{k: v for k, v in new.items() if k in PARAM_KEYS}}
        if MODEL_OUTPUT[model] != "video":
            out.pop("num_frames", None)
        return out, [dict(c) for c in changes]

    def after_oom(
        self, model: str, payload: dict[str, Any], level: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """Smaller parameters for the one retry after an OOM, or None."""
        target = min(level + 1, self.max_level)
        new, changes = self.plan(model, payload, target)
        changes = [c for c in changes if c["from"] != c["to"]]
        if not changes:
            # Nothing left on the ladder: halve the pixel area.
            c = self.constraints[model]
            m = c.multiple_of
            w = max(m, (int(payload["width"] * 0.7071) // m) * m)
            h = max(m, (int(payload["height"] * 0.7071) // m) * m)
            if (w, h) == (payload["width"], payload["height"]):
                return None
            changes = []
            for k, v in (("width", w), ("height", h)):
                if v != payload[k]:
                    changes.append({"param": k, "from": payload[k], "to": v, "reason": ""})
            new = {**payload, "width": w, "height": h}
        for c in changes:
            c["reason"] = f"out of memory on {model}: retried at reduced parameters"
        return new, changes
