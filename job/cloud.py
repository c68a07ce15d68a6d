"""Stop paying when the job is done: ask RunPod or Vast.ai to stop or terminate the instance the job runs on,
through the platform's API and the credentials it injects into the container.

- RunPod injects RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY; REST API `POST /v1/pods/{id}/stop`,
  `DELETE /v1/pods/{id}` (terminate) at https://rest.runpod.io.
- Vast.ai injects CONTAINER_ID and a per-instance CONTAINER_API_KEY; `PUT /api/v0/instances/{id}/` with
  {"state": "stopped"}, `DELETE /api/v0/instances/{id}/` (destroy) at https://console.vast.ai.
RUNPOD_API_BASE / VAST_API_BASE override the base URLs (tests, proxies). Missing credentials are a warning,
never a crash; a failed call is logged and leaves the exit code alone.
"""
from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("job")
TIMEOUT_S = 20


@dataclass(frozen=True)
class Credentials:
    platform: str  # runpod | vast | "" (not on a known platform)
    instance_id: str = ""
    api_key: str = field(default="", repr=False)
    base: str = ""
    missing: tuple[str, ...] = ()

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Credentials:
        if env.get("RUNPOD_POD_ID") or env.get("RUNPOD_API_KEY"):
            return Credentials("runpod", env.get("RUNPOD_POD_ID", ""), env.get("RUNPOD_API_KEY", ""),
                               env.get("RUNPOD_API_BASE", "https://rest.runpod.io"),
                               tuple(v for v in ("RUNPOD_POD_ID", "RUNPOD_API_KEY") if not env.get(v)))
        if env.get("CONTAINER_ID") or env.get("CONTAINER_API_KEY"):
            return Credentials("vast", env.get("CONTAINER_ID", ""), env.get("CONTAINER_API_KEY", ""),
                               env.get("VAST_API_BASE", "https://console.vast.ai"),
                               tuple(v for v in ("CONTAINER_ID", "CONTAINER_API_KEY") if not env.get(v)))
        return Credentials("", missing=("RUNPOD_POD_ID", "RUNPOD_API_KEY", "or CONTAINER_ID", "CONTAINER_API_KEY"))


def _request(creds: Credentials, action: str) -> urllib.request.Request:
    base, pid = creds.base.rstrip("/"), creds.instance_id
    if creds.platform == "runpod":
        url, method, body = (f"{base}/v1/pods/{pid}/stop", "POST", None) if action == "stop" else (
            f"{base}/v1/pods/{pid}", "DELETE", None)
    else:
        url, method, body = (f"{base}/api/v0/instances/{pid}/", "PUT", {"state": "stopped"}) if action == "stop" \
            else (f"{base}/api/v0/instances/{pid}/", "DELETE", None)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {creds.api_key}", "Content-Type": "application/json"}
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def act(action: str, creds: Credentials) -> bool:
    """Ask the platform to `stop` or `terminate` this instance; True when it said yes."""
    if action == "none":
        return True
    if creds.missing or not creds.platform:
        log.warning("POD_ACTION %s skipped: not on RunPod or Vast.ai, or missing %s", action, ", ".join(creds.missing))
        return False
    try:
        with urllib.request.urlopen(_request(creds, action), timeout=TIMEOUT_S) as resp:
            resp.read()
        log.info("asked %s to %s instance %s", creds.platform, action, creds.instance_id)
        return True
    except Exception as e:  # the job's result stands either way
        log.warning("POD_ACTION %s on %s failed: %s", action, creds.platform, type(e).__name__)
        return False
