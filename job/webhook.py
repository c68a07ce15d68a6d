"""WEBHOOK_URL: small JSON events for a person who walked away (started, validation, checkpoint, finished,
failed). Discord webhook URLs get Discord's message format with the images attached.

Delivery runs on one background thread, in order; failures are logged and never stop training.
Payloads go through the log's redaction, so a token can never leave in one.
"""
from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import urllib.request
import uuid
from pathlib import Path

from job.log import redact

log = logging.getLogger("job")
TIMEOUT_S = 10
ATTEMPTS = 3


class Webhook:
    def __init__(self, url: str, run: str):
        self.url, self.run = url, run
        self.discord = "/api/webhooks/" in url  # Discord's (and look-alikes') webhook path
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._deliver_all, daemon=True)
        self._thread.start()

    def send(self, event: str, text: str, images: list[Path] = (), **fields) -> None:
        self._queue.put((event, text, list(images), fields))

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (bounded), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _deliver_all(self) -> None:
        while (item := self._queue.get()) is not None:
            event, text, images, fields = item
            for attempt in range(ATTEMPTS):
                try:
                    body, ctype = (self._discord(event, text, images) if self.discord
                                   else self._json(event, text, images, fields))
                    req = urllib.request.Request(self.url, data=body, headers={"Content-Type": ctype}, method="POST")
                    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                        resp.read()
                    break
                except Exception as e:  # a webhook must never take the run down
                    if attempt == ATTEMPTS - 1:
                        log.warning("webhook %s: not delivered (%s)", event, redact(str(e))[:200])

    def _json(self, event: str, text: str, images: list[Path], fields: dict) -> tuple[bytes, str]:
        payload = {"event": event, "run": self.run, "text": text, **fields,
                   "images": [{"name": p.name, "png_base64": base64.b64encode(p.read_bytes()).decode()}
                              for p in images]}
        return redact(json.dumps(payload)).encode(), "application/json"

    def _discord(self, event: str, text: str, images: list[Path]) -> tuple[bytes, str]:
        """multipart/form-data: payload_json plus one part per image (Discord's attachment format)."""
        boundary = uuid.uuid4().hex
        content = redact(f"**{self.run}** · {event}: {text}")[:2000]
        parts = [("payload_json", None, json.dumps({"content": content}).encode(), "application/json")]
        parts += [(f"files[{i}]", p.name, p.read_bytes(), "image/png") for i, p in enumerate(images[:10])]
        out = b""
        for name, filename, data, ctype in parts:
            disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out += (f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n").encode()
            out += data + b"\r\n"
        return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class NoWebhook:
    def send(self, event: str, text: str, images: list[Path] = (), **fields) -> None:
        pass

    def close(self, timeout: float = 30.0) -> None:
        pass


def make(url: str, run: str):
    return Webhook(url, run) if url else NoWebhook()
