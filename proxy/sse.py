"""Server-sent events: an incremental decoder for node streams and the encoder for our own events.

The decoder follows the WHATWG event-stream rules that matter here: lines end in `\\n`, `\\r\\n` or
`\\r`; `field:value` loses one space after the colon; `data` lines of one event are joined by `\\n`;
a blank line dispatches the event; `id` and `retry` are ignored. Bytes may be split anywhere (inside
a UTF-8 character, between `\\r` and `\\n`). Comment lines (`: keepalive 10/200` from mlx_lm.server
during prefill) come out at once as their own message, so the relay can tell the node is alive.
"""

from __future__ import annotations

import codecs
import typing

import msgspec

from proxy.wire.anthropic import StreamEvent

__all__ = ["PING", "SSEDecoder", "SSEMessage", "encode_event"]


class SSEMessage(msgspec.Struct, frozen=True):
    """One dispatched event (`data` set) or one comment line (`comment` set)."""

    event: str | None = None
    data: str | None = None
    comment: str | None = None


class SSEDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""  # an unfinished line
        self._after_cr = False  # the last chunk ended in \r: a leading \n now belongs to it
        self._first = True
        self._event: str | None = None
        self._data: list[str] = []
        self._data_size = 0

    @property
    def pending(self) -> int:
        """Characters held for an event not yet dispatched (a caller bounds what a peer can make it hold)."""
        return len(self._line) + self._data_size

    def feed(self, data: bytes) -> list[SSEMessage]:
        text = self._utf8.decode(data)
        if not text:
            return []
        if self._first:
            self._first = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._after_cr:
            self._after_cr = False
            if text[:1] == "\n":
                text = text[1:]
        if "\r" in text:
            self._after_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in text:
            self._line += text
            return []
        lines = text.split("\n")
        lines[0] = self._line + lines[0]
        self._line = lines.pop()
        out: list[SSEMessage] = []
        for line in lines:
            self._take(line, out)
        return out

    def flush(self) -> list[SSEMessage]:
        """End of stream: the last line and event count even without their final blank line."""
        out: list[SSEMessage] = []
        tail = self._line + self._utf8.decode(b"", final=True)
        self._line = ""
        if tail:
            for line in tail.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                self._take(line, out)
        self._take("", out)
        return out

    def _take(self, line: str, out: list[SSEMessage]) -> None:
        if not line:
            if self._data:
                out.append(SSEMessage(self._event, "\n".join(self._data)))
            self._event = None
            self._data = []
            self._data_size = 0
            return
        name, _, value = line.partition(":")
        if not name:
            out.append(SSEMessage(comment=value[1:] if value[:1] == " " else value))
            return
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == "event":
            self._event = value or None


PING = b'event: ping\ndata: {"type": "ping"}\n\n'

_encoder = msgspec.json.Encoder()
_PREFIXES: dict[type, bytes] = {
    cls: f"event: {cls.__struct_config__.tag}\ndata: ".encode() for cls in typing.get_args(StreamEvent)
}


def encode_event(event: StreamEvent) -> bytes:
    """`event: <type>\\ndata: <json>\\n\\n`, the JSON carrying the same `type`."""
    buf = bytearray(_PREFIXES[type(event)])
    _encoder.encode_into(event, buf, -1)
    buf += b"\n\n"
    return bytes(buf)
