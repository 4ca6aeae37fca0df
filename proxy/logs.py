"""Logging: the per-request access line (logger `mlxmux.access`) and the JSON log format.

Each `POST /v1/messages` gets one access line when it is over (a stream: when the relay ends).
It carries ids, routing and timing, never prompt text, API keys or headers. With
`server.log_format = "json"` every log line of the process is one JSON object (`JsonFormatter`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import msgspec

from proxy.config import ServerConfig, redact_credentials

access_log = logging.getLogger("mlxmux.access")

SessionIds = Literal["hash", "plain", "off"]

_encode = msgspec.json.Encoder(enc_hook=str).encode
MAX_ERROR_CHARS = 500
"""Characters of an error message in an access line (a node's error page can be long)."""


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class Fields(dict[str, object]):
    """A log message made of fields: `key=value …` as text, merged into the object as JSON. A text value with
    spaces or quotes in it (an error message) is written as a JSON string, so the line still splits into fields."""

    def __str__(self) -> str:
        return " ".join(f"{k}={_text_value(v)}" for k, v in self.items() if v is not None)


def _text_value(value: object) -> str:
    text = str(value)
    if isinstance(value, str) and (not text or any(c.isspace() or c in "\"'=" for c in text)):
        return _encode(text).decode()
    return text


@dataclass(slots=True)
class RequestRecord:
    """What one /v1/messages request did, filled in along the way (`proxy.attempts.Attempt`)."""

    request_id: str = ""
    method: str = "POST"
    path: str = "/v1/messages"
    session: str | None = None
    model: str = ""
    node: str = ""
    reason: str = ""
    attempts: int = 0
    ttft_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    error: str = ""
    """Why the request failed (the message the client got), for the operator reading the line."""
    client: str | None = None
    """The client's address; set on refused logins (401) only, to see where wrong keys come from."""


def session_label(session: str | None, mode: SessionIds) -> str | None:
    """The session id as logged: sha256 (first 12 hex digits), as is, or not at all."""
    if session is None or mode == "off":
        return None
    if mode == "plain":
        return session
    return hashlib.sha256(session.encode()).hexdigest()[:12]


def log_access(record: RequestRecord, status: int | str, session_ids: SessionIds) -> None:
    """Emit the request's access line; `status` is the HTTP status or how the stream ended."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    prompt = record.prompt_tokens
    line = Fields(
        request_id=record.request_id,
        session=session_label(record.session, session_ids),
        method=record.method,
        path=record.path,
        model=record.model or None,
        node=record.node or None,
        reason=record.reason or None,
        attempts=record.attempts,
        status=status,
        ttft_ms=round(record.ttft_ms, 1) if record.ttft_ms else None,
        total_ms=round((time.monotonic() - record.started) * 1000, 1),
        prompt_tokens=prompt,
        cached_tokens=record.cached_tokens,
        cached_share=round(record.cached_tokens / prompt, 3) if prompt else None,
        client=record.client,
        error=_short(record.error) if record.error else None,
    )
    if session_ids == "off":
        del line["session"]
    access_log.info(line)


class RedactingFormatter(logging.Formatter):
    """Wraps the handler's formatter: the user:password of any URL in a finished line (message, arguments,
    traceback) becomes `***`, whoever logged it (node URLs carry credentials: `http://user:pass@mac1:8080`)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact_credentials(self.inner.format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the fields of a `Fields` message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, Fields):
            out["message"] = "request"
            out.update(record.msg)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encode(out).decode()


HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")


def configure_logging(server: ServerConfig) -> None:
    """The process's logging for `mlxmux serve`: one handler, text or JSON, URL credentials redacted, at the
    configured level. httpx logs every request it sends at INFO (four lines a probe round, with node URLs):
    those stay off unless `server.log_http` asks for them; the gateway's own access lines, node state
    changes and (at debug) routing decisions say what matters."""
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(RedactingFormatter(JsonFormatter() if server.log_format == "json" else text))
    logging.basicConfig(level=server.log_level.upper(), handlers=[handler])
    for name in HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if server.log_http else logging.WARNING)
