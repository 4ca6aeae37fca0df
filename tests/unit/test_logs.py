"""Access lines and the JSON log format."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import pytest

from proxy.config import load_settings
from proxy.logs import (
    HTTP_CLIENT_LOGGERS,
    Fields,
    JsonFormatter,
    RedactingFormatter,
    RequestRecord,
    configure_logging,
    log_access,
    session_label,
)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("hash", hashlib.sha256(b"sess-1").hexdigest()[:12]), ("plain", "sess-1"), ("off", None)],
)
def test_session_label(mode, expected) -> None:
    assert session_label("sess-1", mode) == expected
    assert session_label(None, mode) is None


def test_json_formatter_merges_fields_and_keeps_plain_messages() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord("mlxmux.access", logging.INFO, "f", 1, Fields(status=200, node="mac1"), None, None)
    line = json.loads(fmt.format(rec))
    assert line["logger"] == "mlxmux.access" and line["status"] == 200 and line["node"] == "mac1"
    rec = logging.LogRecord("mlxmux.health", logging.WARNING, "f", 1, "node %s down", ("mac2",), None)
    line = json.loads(fmt.format(rec))
    assert line["message"] == "node mac2 down" and line["level"] == "warning"
    assert str(Fields(a=1, b=None, c="x")) == "a=1 c=x"


@pytest.mark.parametrize("mode", ["hash", "off"])
def test_access_line(caplog: pytest.LogCaptureFixture, mode) -> None:
    record = RequestRecord("req_1", session="sess-1", model="claude-opus-4-8", node="mac1", reason="session")
    record.attempts, record.prompt_tokens, record.cached_tokens, record.ttft_ms = 1, 1000, 900, 123.45
    with caplog.at_level(logging.INFO, logger="mlxmux.access"):
        log_access(record, 200, mode)
    (line,) = [r.msg for r in caplog.records]
    assert isinstance(line, Fields)
    assert line["cached_share"] == 0.9 and line["status"] == 200 and line["ttft_ms"] == 123.5
    assert ("session" in line) == (mode != "off")
    assert "sess-1" not in str(line)


@pytest.mark.parametrize("inner", [logging.Formatter("%(levelname)s %(message)s"), JsonFormatter()])
def test_log_lines_never_carry_url_credentials(inner: logging.Formatter) -> None:
    formatter = RedactingFormatter(inner)
    try:
        raise RuntimeError("cannot reach http://alice:pw-123@mac1:8080/v1/models")
    except RuntimeError:
        record = logging.LogRecord(
            "mlxmux.membership",
            logging.INFO,
            __file__,
            1,
            "node %s added (%s)",
            ("m", "http://alice:pw-123@mac1:8080"),
            sys.exc_info(),
        )
    line = formatter.format(record)
    assert "pw-123" not in line and "alice" not in line
    assert line.count("http://***@mac1:8080") >= 2  # the message's argument, and the traceback's


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (Fields(status=503, error="no routable node in pool 'default' (mac1: draining)"),
         'status=503 error="no routable node in pool \'default\' (mac1: draining)"'),
        (Fields(path="/v1/messages", model="claude-opus-4-8"), "path=/v1/messages model=claude-opus-4-8"),
        (Fields(error='say "x=1"'), 'error="say \\"x=1\\""'),
        (Fields(model=""), 'model=""'),
    ],
)  # fmt: skip
def test_text_fields_with_spaces_or_quotes_stay_one_field(fields: Fields, text: str) -> None:
    assert str(fields) == text


def test_an_access_line_says_why_the_request_failed(caplog: pytest.LogCaptureFixture) -> None:
    record = RequestRecord("req_2", error="x" * 2000, client="10.1.2.3")
    with caplog.at_level(logging.INFO, logger="mlxmux.access"):
        log_access(record, 503, "hash")
    (line,) = [r.msg for r in caplog.records]
    assert line["status"] == 503 and line["client"] == "10.1.2.3"
    assert len(line["error"]) == 500 and line["error"].endswith("…")


@pytest.mark.parametrize(("log_http", "level"), [(False, logging.WARNING), (True, logging.NOTSET)])
def test_httpx_request_lines_are_off_unless_asked_for(log_http: bool, level: int) -> None:
    """NOTSET: httpx's loggers then follow the configured level (its per-request lines are INFO)."""
    saved = {name: logging.getLogger(name).level for name in HTTP_CLIENT_LOGGERS}
    try:
        configure_logging(load_settings(env={"MLXMUX_LOG_HTTP": str(log_http).lower()}).server)
        assert {logging.getLogger(name).level for name in HTTP_CLIENT_LOGGERS} == {level}
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)
