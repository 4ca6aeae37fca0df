"""Checks made before a request is routed, so that a client's mistake is answered by the gateway (400)
and never reaches a node, where it would look like the node's failure.

- `check_sampling`: what the Anthropic API checks beyond the types (the msgspec structs in
  `proxy.wire.anthropic` check those): temperature and top_p in [0, 1], top_k >= 0. Messages are
  worded like Anthropic's own (`temperature: range: 0..1`).
- `session_key_part`: a session or agent id from a header or `metadata.user_id`, made safe to use as a
  routing key, a store key, a log field and an upstream header: printable ASCII up to
  `MAX_SESSION_ID` characters is kept as it is; anything else becomes `h:` + 32 hex digits of its
  SHA-256 (stable, so the conversation still keeps its node).
"""

from __future__ import annotations

import hashlib
import math
import re

from msgspec import UNSET

from proxy.errors import InvalidRequest

MAX_SESSION_ID = 128
"""Longest session (or agent) id used as it is; longer ones are hashed."""

_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def session_key_part(value: str) -> str:
    """`value` if it is 1..MAX_SESSION_ID visible ASCII characters, else `h:<32 hex>` of its SHA-256."""
    if len(value) <= MAX_SESSION_ID and _PRINTABLE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"h:{digest[:32]}"


def _in_range(name: str, value: object, low: float, high: float) -> None:
    if value is None or value is UNSET:
        return
    assert isinstance(value, int | float)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(f"{name}: range: {low:g}..{high:g} (got {value!r})")


def check_sampling(temperature: object, top_p: object, top_k: object) -> None:
    """Refuse (400) sampling parameters out of the range Anthropic accepts. Types are checked by decoding."""
    _in_range("temperature", temperature, 0, 1)
    _in_range("top_p", top_p, 0, 1)
    if isinstance(top_k, int) and top_k < 0:
        raise InvalidRequest(f"top_k: must be >= 0 (got {top_k})")
