"""Fault injection: off unless the application config enables it.

The fault table lives in Ray's GCS key-value store (one key per
application), written by the router's admin routes and read by every model
replica every ``fault_injection.poll_s`` (≤ 1 s), so a fault reaches every
replica of a model, including replicas started later. Modes, all applied
inside the model replica:

``error``       the generation fails (a model error)
``hang``        block for ``delay_s`` (default: until cleared), then fail
``slow``        add ``delay_s``, then succeed
``oom``         raise ``torch.OutOfMemoryError``
``nan``         the model output is replaced by NaN
``crash``       the replica process exits (``os._exit``)
``init_error``  replicas that start while it is active fail in their constructor

A ``hang`` in progress wakes and fails when the faults are cleared (or when
the request is cancelled), so no worker thread or replica slot leaks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("genguard.faults")

FAULT_MODES = ("error", "hang", "slow", "oom", "nan", "crash", "init_error")
KV_NAMESPACE = "genguard"


class FaultSpec(BaseModel):
    """Body of ``POST /admin/faults``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    mode: Literal["error", "hang", "slow", "oom", "nan", "crash", "init_error"]
    rate: float = Field(1.0, ge=0.0, le=1.0)
    duration_s: float | None = Field(None, gt=0, le=86_400)
    delay_s: float | None = Field(None, ge=0, le=3_600)
    # Fire at most this many times in each replica (e.g. one OOM, then healthy).
    max_hits: int | None = Field(None, ge=1)


class InjectedFault(RuntimeError):
    """Raised inside a replica by an injected ``error`` or ``hang``."""

    def __init__(self, model: str, mode: str):
        self.model, self.mode = model, mode
        super().__init__(f"injected {mode} fault on {model}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (InjectedFault, (self.model, self.mode))


def _kv_key(app_name: str) -> bytes:
    return f"genguard/faults/{app_name}".encode()


class FaultStore:
    """The fault table in the GCS KV store (needs a connected Ray worker)."""

    def __init__(self, app_name: str):
        self.key = _kv_key(app_name)

    def _read_raw(self) -> dict[str, Any]:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
        if not raw:
            return {"generation": 0, "faults": []}
        return dict(json.loads(raw))

    def _write(self, doc: dict[str, Any]) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, json.dumps(doc).encode(), overwrite=True, namespace=KV_NAMESPACE)

    def read(self) -> dict[str, Any]:
        """{"generation": n, "faults": [active fault dicts]} (expired ones dropped)."""
        doc = self._read_raw()
        now = time.time()
        doc["faults"] = [f for f in doc["faults"] if f.get("expires_at") is None or f["expires_at"] > now]
        return doc

    def add(self, spec: FaultSpec) -> dict[str, Any]:
        doc = self.read()
        fault = spec.model_dump()
        fault["id"] = uuid.uuid4().hex[:12]
        fault["created_at"] = time.time()
        fault["expires_at"] = fault["created_at"] + spec.duration_s if spec.duration_s else None
        doc["faults"].append(fault)
        self._write(doc)
        return fault

    def clear(self) -> int:
        """Remove every fault; bumps the generation so hangs in progress wake."""
        doc = self.read()
        n = len(doc["faults"])
        self._write({"generation": int(doc.get("generation", 0)) + 1, "faults": []})
        return n


class FaultInjector:
    """Inside a model replica: follows the fault table and applies faults."""

    def __init__(self, model: str, app_name: str, *, enabled: bool, poll_s: float = 0.5,
                 rng: random.Random | None = None):
        self.model = model
        self.enabled = enabled
        self.poll_s = poll_s
        self.rng = rng or random.Random()
        self.store = FaultStore(app_name)
        self.generation = 0
        self.faults: list[dict[str, Any]] = []
        self.cleared = threading.Condition()
        self.injected: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- table following ----------------------------------------------------
    def refresh(self) -> None:
        doc = self.store.read()
        mine = [f for f in doc["faults"] if f.get("model") == self.model]
        with self.cleared:
            changed = int(doc.get("generation", 0)) != self.generation
            self.generation = int(doc.get("generation", 0))
            self.faults = mine
            if changed:
                self.cleared.notify_all()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.refresh()

        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                try:
                    self.refresh()
                except Exception as exc:  # GCS briefly unreachable: keep the last table
                    log.warning("fault table refresh failed: %s", exc)

        self._thread = threading.Thread(target=loop, name=f"faults-{self.model}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _active(self, mode: str) -> dict[str, Any] | None:
        now = time.time()
        for f in self.faults:
            if f["mode"] != mode:
                continue
            if f.get("expires_at") is not None and f["expires_at"] <= now:
                continue
            limit = f.get("max_hits")
            if limit is not None and self.hits.get(f["id"], 0) >= int(limit):
                continue
            if self.rng.random() < float(f.get("rate", 1.0)):
                self.injected[mode] = self.injected.get(mode, 0) + 1
                self.hits[f["id"]] = self.hits.get(f["id"], 0) + 1
                return f
        return None

    # -- hooks ------------------------------------------------------------------
    def on_init(self) -> None:
        """Constructor hook: fail while an ``init_error`` fault is active."""
        if not self.enabled:
            return
        self.refresh()
        if self._active("init_error") is not None:
            raise InjectedFault(self.model, "init_error")

    def before_generate(self, cancel: threading.Event) -> bool:
        """Worker-thread hook before the pipeline runs. Returns True when the
        output must be replaced by NaN."""
        if not self.enabled or not self.faults:
            return False
        if self._active("crash") is not None:
            log.error("injected crash: exiting replica process %d", os.getpid())
            os._exit(1)
        if self._active("oom") is not None:
            import torch

            raise torch.OutOfMemoryError(f"injected oom fault on {self.model}")
        if self._active("error") is not None:
            raise InjectedFault(self.model, "error")
        hang = self._active("hang")
        if hang is not None:
            self._wait(hang.get("delay_s"), cancel)
            raise InjectedFault(self.model, "hang")
        slow = self._active("slow")
        if slow is not None:
            self._wait(float(slow.get("delay_s") or 1.0), cancel)
            if cancel.is_set():
                raise InjectedFault(self.model, "slow")
        return self._active("nan") is not None

    def _wait(self, delay_s: float | None, cancel: threading.Event) -> None:
        """Block for delay_s (None: until cleared); wake early on clear or cancel."""
        start_gen = self.generation
        end = None if delay_s is None else time.monotonic() + float(delay_s)
        with self.cleared:
            while not cancel.is_set() and self.generation == start_gen:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                self.cleared.wait(timeout=0.1 if left is None else min(0.1, left))
