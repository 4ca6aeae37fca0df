"""Server-sent events: an incremental decoder for node streams and the encoder for our own events.

The decoder follows the WHATWG event-stream rules that matter here: lines end in `\\n`, `\\r\\n` or
`\\r`; `field:value` loses one space after the colon; `data` lines of one event are joined by `\\n`;
a blank line dispatches the event; `id` and `retry` are ignored. Bytes may be split anywhere (inside
a UTF-8 character, between `\\r` and `\\n`). Comment lines (`: keepalive 10/200` from mlx_lm.server
during prefill) come out at once as their own message, so the relay can tell the node is alive.
"""

from __future__ import annotations

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
    """Incremental decoder. Work and memory are linear in the bytes fed, however long a line runs: the
    bytes of an unfinished line are appended to one buffer (never re-copied per chunk), line ends are
    searched for in the new bytes only, and each line is decoded once, when it ends. `\r` and `\n` never
    occur inside a UTF-8 sequence, so splitting bytes first is the same as splitting text."""

    def __init__(self) -> None:
        self._line = bytearray()  # the bytes of an unfinished line
        self._after_cr = False  # the last chunk ended in \r: a leading \n now belongs to it
        self._first = True
        self._event: str | None = None
        self._data: list[str] = []
        self._data_size = 0
        self.scanned = 0
        """Bytes searched or copied so far: at most twice what was fed (each byte is searched once in its
        chunk and copied once more when its line ends)."""

    @property
    def pending(self) -> int:
        """Bytes and characters held for an event not yet dispatched (a caller bounds what a peer can make it hold)."""
        return len(self._line) + self._data_size

    def feed(self, data: bytes) -> list[SSEMessage]:
        if not data:
            return []
        self.scanned += len(data)
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._after_cr = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in data:  # the line goes on
            self._line += data
            return []
        lines: list[bytes | bytearray] = list(data.split(b"\n"))
        tail = lines.pop()
        if self._line:
            self._line += lines[0]
            self.scanned += len(self._line)
            lines[0], self._line = self._line, bytearray()
        self._line += tail
        out: list[SSEMessage] = []
        for line in lines:
            self._take(self._text(line), out)
        return out

    def flush(self) -> list[SSEMessage]:
        """End of stream: the last line and event count even without their final blank line."""
        out: list[SSEMessage] = []
        tail, self._line = self._line, bytearray()
        if tail:
            self._take(self._text(tail), out)
        self._take("", out)
        return out

    def _text(self, line: bytes | bytearray) -> str:
        text = line.decode("utf-8", "replace")
        if self._first:
            self._first = False
            if text[:1] == "\ufeff":
                text = text[1:]
        return text

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
